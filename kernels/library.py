"""``torch.library`` custom ops under the ``milp`` namespace, with fake impls and autograd.

Serving stacks call them without importing ``milp`` (``import kernels`` registers them)::

    y, t = torch.ops.milp.lora_linear(x, weight, bias, lora_a, lora_b, lora_scale, slots,
                                      sorted_tokens, tiles, segments, block_ms, max_rank, False)

==========================  ==========================================================
op                          what
==========================  ==========================================================
``milp::lora_linear``       ``(y, t)``: fused base + multi-LoRA forward (autograd)
``milp::lora_linear_backward``  ``(dx, dA, dB)`` for the above
``milp::lora_shrink``       ``t = s ⊙ x Aᵀ`` per segment
``milp::lora_expand_``      ``y += t B`` per segment, in place
==========================  ==========================================================

Argument conventions: ``x [T, K]``; ``weight [N, K]`` (or ``None``, with no bias: the
adapters' contribution alone, by the split path's kernels); ``lora_a [cap, K]``; ``lora_b
[cap, N]``; ``lora_scale [cap] float32``; ``slots [U, 2] int32``; ``sorted_tokens``,
``tiles``, ``segments``, ``block_ms`` from :meth:`kernels.plan.BatchPlan.as_args`;
``max_rank`` ≥ every slot's rank (the bank's ``max_rank``: refused otherwise on CPU and
under ``MILP_DEBUG=1``; on a GPU without it the kernels clamp a larger slot rank to
``max_rank`` and stay inside ``t``). CUDA tensors run the Triton kernels; CPU tensors the
torch paths (see :mod:`kernels._backend`). ``path`` picks the kernels
(:func:`kernels.tuning.choose_path`): ``"split"`` (cuBLAS base + split-K shrink + expand:
decode), ``"fused"`` (one launch, ``t`` in registers: small ranks) or ``"fused_t"`` (shrink,
then the base GEMM with the expand in its epilogue); ``"auto"`` decides by token count and
rank. The split path's schedule (GEMM or expand first, the shrink on a side stream beside
the GEMM, decode as two branches inside a CUDA graph) follows the dispatch knobs of
:func:`kernels.tuning.split_schedule`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._backend import SideStream, backend_for, nvtx_range
from ._checks import FLOAT_DTYPES, check_tensor
from ._checks import values_checked as _values_checked  # patched by bench tools to time a GPU host's work
from .ops._common import acc_dtype
from .ops.expand import lora_expand_, lora_expand_torch_
from .ops.fused_linear import fused_lora_linear, fused_lora_linear_torch
from .ops.grad_weights import lora_grad_weights, lora_grad_weights_torch
from .ops.shrink import lora_shrink, lora_shrink_torch
from .tuning import PATHS, choose_path, split_schedule

__all__ = ["check_lora_args", "direct_call_ok", "lora_linear_forward", "lora_linear_backward", "EagerLoraLinear"]

_INT_DTYPES = (torch.int32,)


def check_lora_args(
    x: Tensor,
    lora_a: Tensor,
    lora_scale: Tensor | None,
    slots: Tensor,
    sorted_tokens: Tensor,
    tiles: Tensor,
    segments: Tensor,
    block_ms: list[int],
    max_rank: int,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    lora_b: Tensor | None = None,
    n: int | None = None,
    values: bool = True,
    names: tuple[str, str, str] = ("x", "lora_a", "max_rank"),
) -> None:
    """Validate the shared arguments of the ops; errors name the argument and the expectation.

    ``values=False`` skips the checks that read tensor contents (fake/meta tensors).
    ``names``: what the errors call ``x``, ``lora_a`` and ``max_rank`` (``lora_expand_``
    passes ``y``, ``lora_b`` and ``t``'s columns in their places).
    """
    _check_structure(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank, weight, bias,
                     lora_b, n, names)
    if values and _values_checked(x):
        _check_values(lora_a, lora_scale, slots, sorted_tokens, segments, max_rank, x.shape[0], names)


def _unit_last(t: Tensor) -> bool:
    """Whether ``t``'s last dimension is dense: stride 1, or a size of 0 or 1, where the stride
    means nothing (``torch.randn(0, 1) * 2`` has strides ``(1, 0)`` and is contiguous)."""
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def _check_structure(x: Tensor, lora_a: Tensor, lora_scale: Tensor | None, slots: Tensor, sorted_tokens: Tensor,
                     tiles: Tensor, segments: Tensor, block_ms: list[int], max_rank: int, weight: Tensor | None,
                     bias: Tensor | None, lora_b: Tensor | None, n: int | None,
                     names: tuple[str, str, str] = ("x", "lora_a", "max_rank")) -> None:
    """The shapes, dtypes, devices and layouts of :func:`check_lora_args`, each failure named."""
    x_name, a_name, _ = names
    check_tensor(x_name, x, ndim=2, dtypes=FLOAT_DTYPES)
    dev = x.device
    T, K = x.shape
    if not _unit_last(x):
        raise ValueError(f"{x_name} must have unit stride in its last dimension (call .contiguous())")
    if weight is not None:
        check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=dev)
        if weight.shape[1] != K:
            raise ValueError(f"weight must have shape [N, {K}] to match x [{T}, {K}], got {list(weight.shape)}")
        n = weight.shape[0]
    elif bias is not None:
        raise ValueError("bias must be None when weight is None (the adapters' contribution alone)")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=(x.dtype,), device=dev)
    check_tensor(a_name, lora_a, ndim=2, dtypes=(x.dtype,), device=dev)
    if lora_a.shape[1] != K:
        raise ValueError(f"{a_name} must have shape [capacity, {K}] to match {x_name}, got {list(lora_a.shape)}")
    cap = lora_a.shape[0]
    if lora_b is not None:
        check_tensor("lora_b", lora_b, shape=(cap, n), dtypes=(x.dtype,), device=dev)
    for name, t in ((a_name, lora_a), ("lora_b", lora_b)):
        if t is not None and t.numel() and not _unit_last(t):
            raise ValueError(f"{name} must be row-contiguous (stride 1 along its columns)")
    if lora_scale is not None:
        check_tensor("lora_scale", lora_scale, shape=(cap,), dtypes=(torch.float32,), device=dev)
    check_tensor("slots", slots, ndim=2, dtypes=_INT_DTYPES, device=dev)
    if slots.shape[1] != 2 or not slots.is_contiguous():
        raise ValueError(f"slots must be a contiguous [max_users, 2] int32 table, got {list(slots.shape)}")
    check_tensor("sorted_tokens", sorted_tokens, ndim=1, dtypes=_INT_DTYPES, device=dev)
    if sorted_tokens.numel() < T:
        raise ValueError(f"sorted_tokens holds {sorted_tokens.numel()} tokens, fewer than {x_name}'s {T} "
                         f"(plan too small)")
    # the kernels index these 1-D tensors as dense arrays (a strided one reads other elements)
    if sorted_tokens.stride(0) != 1 or (lora_scale is not None and lora_scale.stride(0) != 1) or (
            bias is not None and bias.stride(0) != 1):
        for name, t in (("bias", bias), ("lora_scale", lora_scale), ("sorted_tokens", sorted_tokens)):
            if t is not None and t.numel() > 1 and t.stride(0) != 1:
                raise ValueError(f"{name} must be contiguous (call .contiguous()), got stride {t.stride(0)}")
    check_tensor("segments", segments, ndim=2, dtypes=_INT_DTYPES, device=dev)
    check_tensor("tiles", tiles, ndim=2, dtypes=_INT_DTYPES, device=dev)
    if segments.shape[1] != 3 or tiles.shape[1] != 3 or not (segments.is_contiguous() and tiles.is_contiguous()):
        raise ValueError("segments and tiles must be contiguous [*, 3] int32 tables (from BatchPlan.as_args())")
    if not block_ms:
        raise ValueError("block_ms must list the plan's tile heights")
    # (a SymInt in the fake impls under a dynamic-shape trace: the backward's comes from the forward's)
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, torch.SymInt)) or max_rank < 0:
        raise ValueError(f"max_rank must be an int >= 0, got {max_rank!r}")


def _check_values(lora_a: Tensor, lora_scale: Tensor | None, slots: Tensor, sorted_tokens: Tensor, segments: Tensor,
                  max_rank: int, num_tokens: int, names: tuple[str, str, str] = ("x", "lora_a", "max_rank")) -> None:
    """The checks of :func:`check_lora_args` that read tensor contents (in one host read)."""
    x_name, a_name, rank_name = names
    parts = {}
    if lora_scale is not None:
        parts["finite"] = torch.isfinite(lora_scale).all().reshape(1)
    if slots.numel():  # in int64: an offset near 2**31 plus a rank must not wrap below the row count
        s = slots.long()
        # columns (offset, rank, offset + rank): their minima, then their maxima
        parts["slots"] = torch.cat(torch.aminmax(torch.cat([s, s.sum(1, keepdim=True)], 1), dim=0))
    if segments.numel():
        g = segments.long()
        # columns (start, end, user, end - start): their minima, then their maxima
        parts["segments"] = torch.cat(torch.aminmax(torch.cat([g, torch.diff(g[:, :2], dim=1)], 1), dim=0))
    if num_tokens:
        parts["tokens"] = torch.stack(torch.aminmax(sorted_tokens[:num_tokens]))
    if not parts:
        return
    flat = torch.cat([p.long() for p in parts.values()]).tolist()
    v, i = {}, 0
    for key, p in parts.items():
        v[key], i = flat[i : i + p.numel()], i + p.numel()
    if lora_scale is not None and not v["finite"][0]:
        raise ValueError("lora_scale contains NaN or inf")
    if slots.numel():
        off_min, rank_min, _, _, rank, end = v["slots"]
        if off_min < 0 or rank_min < 0:
            raise ValueError("slots must hold offsets >= 0 and ranks >= 0 (rank 0 = no adapter)")
        if end > lora_a.shape[0]:
            raise ValueError(f"slots point past {a_name}'s {lora_a.shape[0]} rows")
        if rank > max_rank:
            raise ValueError(f"{rank_name}={max_rank} is smaller than the largest slot rank {rank}")
    if segments.numel():
        start, _, _, length, _, end, user, _ = v["segments"]
        if user >= slots.shape[0]:
            raise ValueError(f"segments name user {user}, outside slots' {slots.shape[0]} users")
        if length < 0:
            raise ValueError("segments must be (start, end, user) rows with start <= end")
        # the segments cover x's first num_tokens sorted positions, and these name x's tokens
        if start < 0 or end > num_tokens:
            raise ValueError(f"segments span sorted positions [{start}, {end}), outside {x_name}'s {num_tokens} "
                             f"tokens (a plan for another batch?)")
    if num_tokens:
        lo, hi = v["tokens"]
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"sorted_tokens name tokens in [{lo}, {hi}], outside {x_name}'s {num_tokens} "
                             f"(a plan for another batch?)")


def direct_call_ok(x: Tensor) -> bool:
    """Whether ``lora_linear`` may skip the dispatcher in this call: eager, a plain tensor (no
    subclass, no ``torch.func`` wrapper, no ``torch.func`` transform of another argument), no
    torch function/dispatch mode and no profiler (whose traces name the op
    ``milp::lora_linear``). Then :func:`lora_linear_forward` runs directly
    when there is nothing to differentiate, and :class:`EagerLoraLinear` when there is."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch._C._len_torch_function_stack() and not torch._C._len_torch_dispatch_stack()
            and not torch.autograd._profiler_enabled() and not _functorch_wrapped(x) and not _functorch_depth())


_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)
# a transform of another argument (vmap over the weight) leaves x plain but would hand the
# kernels wrapped tensors: any active functorch layer takes the op
_functorch_depth = getattr(getattr(torch._C, "_functorch", None), "get_dynamic_layer_stack_depth", lambda: 0)


# --------------------------------------------------------------------------- lora_linear
def _check_path(path: str) -> None:
    if path != "auto" and path not in PATHS:
        raise ValueError(f"path must be 'auto' or one of {PATHS}, got {path!r}")


def _linear_with_adapters(x: Tensor, weight: Tensor | None, bias: Tensor | None, p: Tensor, q: Tensor,
                          lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
                          block_ms: list[int], max_rank: int, path: str, store_t: bool, weight_layout: str,
                          then: Callable[[Tensor], tuple[Tensor, ...]] | None = None,
                          ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``x W' + b + (s ⊙ x Pᵀ) Q`` and (optionally) ``t = s ⊙ x Pᵀ``, by the chosen path.

    Forward: ``W' = Wᵀ``, ``P = A``, ``Q = B``. Input gradient: ``W' = W``
    (``weight_layout="kn"``), ``P = B``, ``Q = A``.

    ``then(t)`` (the backward's grouped ``dA``/``dB``; needs ``store_t``) runs once ``t``
    exists and returns a tuple of tensors, handed back as a third result: where the split path
    overlaps its shrink with the base GEMM (:func:`kernels.tuning.split_overlap`) it runs on the
    side stream too, beside the GEMM and the expand.
    """
    if then is None:
        then = _no_extra
    elif not store_t:
        raise ValueError("then needs store_t: it consumes the full t")
    if weight is None and path not in ("auto", "split"):
        raise ValueError(f"path={path!r} fuses the base GEMM; with weight=None (the adapters' contribution alone) "
                         f"the path is 'split' (or 'auto')")
    if backend_for(x) == "torch":
        y, t = fused_lora_linear_torch(x, weight, bias, p, q, lora_scale, slots, sorted_tokens, segments, max_rank,
                                       weight_layout=weight_layout, store_t=store_t)
        return y, t, then(t)
    if path == "auto":
        path = "split" if weight is None else choose_path(x.shape[0], max_rank, device=x.device)
    if path != "split":
        y, t = fused_lora_linear(x, weight,  # type: ignore[arg-type]  # weight: not None off the split path (above)
                                 bias, p, q, lora_scale, slots, sorted_tokens, tiles, segments, block_ms,
                                 max_rank, weight_layout=weight_layout, store_t=store_t,
                                 precompute_t=path == "fused_t")
        return y, t, then(t)
    # decode: the base GEMV is memory-bound and cuBLAS streams W exactly once; the adapters add
    # one split-K shrink (reads each A once) and one expand. Without a t to keep, the shrink
    # leaves its split-K partials for the expand to add up: three launches (no zero-fill of t),
    # no atomics
    w = weight if weight is None or weight_layout == "nk" else weight.t()

    def shrink() -> Tensor:
        return lora_shrink(x, p, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank,
                           partials=not store_t)

    def expand(y: Tensor, accumulate: bool = True) -> None:
        lora_expand_(y, t, q, slots, sorted_tokens, tiles, segments, block_ms, accumulate=accumulate)

    # the adapters alone (no weight): the expand-first schedule without its GEMM
    parallel, expand_first, overlap = (split_schedule(x.shape[0], x.device) if w is not None
                                       else (False, True, False))
    if parallel and not store_t and _capturing(x.device):
        # inference, in a CUDA graph: shrink and t B on a side stream beside cuBLAS, then y += t B
        side = SideStream(x.device)
        with side:
            t = shrink()
            d = x.new_empty(x.shape[0], w.shape[0])  # type: ignore[union-attr]  # w: not None where parallel
            expand(d, accumulate=False)
        y = torch.nn.functional.linear(x, w, bias)  # type: ignore[arg-type]  # (as above)
        side.join(t, d)
        y.add_(d)
        extra: tuple[Tensor, ...] = ()
    elif expand_first and bias is None:
        # the expand writes t B into every row of y, cuBLAS adds x Wᵀ in its epilogue
        t = shrink()
        y = x.new_empty(x.shape[0], q.shape[1])
        expand(y, accumulate=False)
        if w is not None:
            y.addmm_(x, w.t())
        extra = then(t)
    elif overlap:
        # the shrink (and then's work) on a side stream, beside cuBLAS; the expand waits for t
        side = SideStream(x.device)
        with side:
            t = shrink()
            t_ready = side.mark()
            extra = then(t)
        y = torch.nn.functional.linear(x, w, bias)  # type: ignore[arg-type]  # w: not None where overlap
        side.wait(t_ready)
        expand(y)
        side.join(t, *extra)
    else:
        t = shrink()
        y = torch.nn.functional.linear(x, w, bias)  # type: ignore[arg-type]  # w: None goes expand_first
        expand(y)
        extra = then(t)
    return y, (t if store_t else t.new_empty(0)), extra


def _no_extra(t: Tensor) -> tuple:
    """The ``then`` of :func:`_linear_with_adapters` when there is nothing to run after ``t``."""
    return ()


def _capturing(device: torch.device) -> bool:
    """Whether work on ``device``'s current stream is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def lora_linear_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                        lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
                        block_ms: list[int], max_rank: int, save_t: bool, path: str = "auto") -> tuple[Tensor, Tensor]:
    """The body of ``milp::lora_linear`` as a plain function: checks, then the chosen path.

    :func:`kernels.lora_linear` calls it directly for eager work without autograd (no
    dispatcher round trip, a few tens of microseconds per call on the host), and eager
    training through :class:`EagerLoraLinear`; everything else (``torch.compile``, fake
    tensors, profiling, modes, ``torch.func``) goes through the op.
    """
    check_lora_args(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank,
                    weight=weight, bias=bias, lora_b=lora_b)
    _check_path(path)
    with nvtx_range("milp.lora_linear"):
        y, t, _ = _linear_with_adapters(x, weight, bias, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles,
                                        segments, block_ms, max_rank, path, save_t, "nk")
        return y, t


@torch.library.custom_op("milp::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_scale: Tensor,
    slots: Tensor,
    sorted_tokens: Tensor,
    tiles: Tensor,
    segments: Tensor,
    block_ms: list[int],
    max_rank: int,
    save_t: bool,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(y, t)``; ``path`` = ``"auto"`` or one of :data:`kernels.tuning.PATHS`."""
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments,
                               block_ms, max_rank, save_t, path)


@lora_linear_op.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_scale: Tensor,
      slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor, block_ms: list[int], max_rank: int,
      save_t: bool, path: str = "auto") -> tuple[Tensor, Tensor]:
    check_lora_args(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank,
                    weight=weight, bias=bias, lora_b=lora_b, values=False)
    _check_path(path)
    acc = acc_dtype(x.dtype)
    t = x.new_empty(x.shape[0], max_rank, dtype=acc) if save_t else x.new_empty(0, dtype=acc)
    return x.new_empty(x.shape[0], lora_b.shape[1] if weight is None else weight.shape[0]), t


def lora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                         lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
                         block_ms: list[int], max_rank: int, t_fwd: Tensor, need_dx: bool, need_dlora: bool,
                         path: str = "auto", *, checked: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``milp::lora_linear_backward`` as a plain function: ``(dx, dA, dB)``; an
    output not asked for is an empty tensor.

    ``dx = dy W + (s ⊙ dy Bᵀ) A`` runs through the forward's kernels with the roles of
    ``A`` and ``B`` swapped, keeping ``t_bwd = s ⊙ dy Bᵀ`` for ``dA``; ``dA`` and ``dB``
    of every user come from one grouped launch. ``checked=True`` skips the argument checks:
    :class:`EagerLoraLinear` passes the tensors its forward checked, and autograd hands it a
    ``dy`` of ``y``'s shape, dtype and device.
    """
    if not checked:
        _check_backward_args(dy, x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments,
                             block_ms, max_rank, t_fwd, path)
    dy = dy.contiguous()
    cap = lora_a.shape[0]
    torch_path = backend_for(x) == "torch"
    with nvtx_range("milp.lora_linear_backward"):
        if torch_path:
            def shrink(inp: Tensor, a: Tensor) -> Tensor:
                return lora_shrink_torch(inp, a, lora_scale, slots, sorted_tokens, segments, max_rank)
        else:
            def shrink(inp: Tensor, a: Tensor) -> Tensor:
                return lora_shrink(inp, a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank)

        def grads(t_bwd: Tensor) -> tuple[Tensor, Tensor]:  # (dA, dB) of every user in one grouped launch
            t_f = t_fwd
            if t_f.numel() == 0 and x.shape[0] and max_rank:
                t_f = shrink(x, lora_a)
            if torch_path:
                return lora_grad_weights_torch(x, dy, t_bwd, t_f, slots, sorted_tokens, segments, cap)
            return lora_grad_weights(x, dy, t_bwd, t_f, slots, sorted_tokens, segments, cap, max_rank)

        if need_dx:
            dx, _, dab = _linear_with_adapters(dy, weight, None, lora_b, lora_a, lora_scale, slots, sorted_tokens,
                                               tiles, segments, block_ms, max_rank, path, need_dlora, "kn",
                                               then=grads if need_dlora else None)
            return ((dx, *dab) if need_dlora  # type: ignore[return-value]  # dab: grads' (dA, dB)
                    else (dx, x.new_empty(0), x.new_empty(0)))
        if not need_dlora:
            return x.new_empty(0), x.new_empty(0), x.new_empty(0)
        return (x.new_empty(0), *grads(shrink(dy, lora_b)))


def _check_backward_args(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                         lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
                         block_ms: list[int], max_rank: int, t_fwd: Tensor, path: str, values: bool = True) -> None:
    """The arguments of ``milp::lora_linear_backward`` (``values=False``: its fake impl)."""
    check_lora_args(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank,
                    weight=weight, lora_b=lora_b, values=values)
    check_tensor("dy", dy, shape=(x.shape[0], lora_b.shape[1]), dtypes=(x.dtype,), device=x.device)
    _check_t_fwd(t_fwd, x, max_rank)
    _check_path(path)


def _check_t_fwd(t_fwd: Tensor, x: Tensor, max_rank: int) -> None:
    """``t_fwd``: the forward's ``t`` (``[T, max_rank]``, accumulator dtype), or empty (recomputed)."""
    check_tensor("t_fwd", t_fwd, device=x.device)
    if t_fwd.numel():
        check_tensor("t_fwd", t_fwd, shape=(x.shape[0], max_rank), dtypes=(acc_dtype(x.dtype),))
        if not _unit_last(t_fwd):
            raise ValueError("t_fwd must have unit stride in its last dimension (call .contiguous())")


@torch.library.custom_op("milp::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_scale: Tensor,
    slots: Tensor,
    sorted_tokens: Tensor,
    tiles: Tensor,
    segments: Tensor,
    block_ms: list[int],
    max_rank: int,
    t_fwd: Tensor,
    need_dx: bool,
    need_dlora: bool,
    path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``: :func:`lora_linear_backward` as an op."""
    return lora_linear_backward(dy, x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments,
                                block_ms, max_rank, t_fwd, need_dx, need_dlora, path)


@lora_linear_backward_op.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor, lora_scale: Tensor, slots: Tensor,
      sorted_tokens: Tensor, tiles: Tensor, segments: Tensor, block_ms: list[int], max_rank: int, t_fwd: Tensor,
      need_dx: bool, need_dlora: bool, path: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    _check_backward_args(dy, x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments, block_ms,
                         max_rank, t_fwd, path, values=False)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    if need_dlora:
        return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)
    return dx, x.new_empty(0), x.new_empty(0)


def _setup_lora_linear(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    (x, weight, bias, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank,
     save_t, path) = inputs
    _, t = output
    # t is kept for the backward, never differentiated: no zero-filled gradient for it
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments, t)
    ctx.block_ms = block_ms
    ctx.max_rank = max_rank
    ctx.has_bias = bias is not None
    ctx.path = path


def _grads(ctx: Any, grad_y: Tensor | None,
           backward: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor | None, ...]:
    """The input gradients of ``lora_linear`` from its saved context (``backward``: the op, or
    :func:`lora_linear_backward` itself in eager mode)."""
    x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments, t = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dw, need_db, need_da, need_dlb = need[0], need[1], need[2], need[3], need[4]
    if grad_y is None:  # y took no part in the loss (grads are not materialised: see the setup)
        return (None,) * 14
    grad_y = grad_y.contiguous()
    dx, da, dlb = backward(
        grad_y, x, weight, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles, segments, ctx.block_ms,
        ctx.max_rank, t, need_dx, need_da or need_dlb, ctx.path,
    )
    dw = grad_y.t().mm(x) if need_dw else None
    dbias = grad_y.sum(0) if (need_db and ctx.has_bias) else None
    return (dx if need_dx else None, dw, dbias, da if need_da else None, dlb if need_dlb else None,
            None, None, None, None, None, None, None, None, None)


def _backward_lora_linear(ctx: Any, grad_y: Tensor | None, grad_t: Tensor | None) -> tuple[Tensor | None, ...]:
    return _grads(ctx, grad_y, torch.ops.milp.lora_linear_backward)


class EagerLoraLinear(torch.autograd.Function):
    """``milp::lora_linear`` with autograd, for eager training: the same functions as the op
    and its registered autograd, without the dispatcher round trips of a custom op. On a CPU
    host that halves what a forward + backward adds to a plain linear's host time (about 430 µs
    down to 220; ``bench/test_host_overhead.py``). :func:`kernels.lora_linear` uses it where
    :func:`direct_call_ok` holds; ``torch.compile``, profiling, modes and ``torch.func`` keep
    the op."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
                block_ms: list[int], max_rank: int, path: str) -> Tensor:
        y, t = lora_linear_forward(x, weight, bias, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles,
                                   segments, block_ms, max_rank, True, path)
        _setup_lora_linear(ctx, (x, weight, bias, lora_a, lora_b, lora_scale, slots, sorted_tokens, tiles,
                                 segments, block_ms, max_rank, True, path), (y, t))
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:
        return _grads(ctx, grad_y, _checked_backward)[:13]  # no save_t input here


def _checked_backward(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lora_linear_backward` on arguments its forward already checked."""
    return lora_linear_backward(*args, checked=True)


torch.library.register_autograd("milp::lora_linear", _backward_lora_linear, setup_context=_setup_lora_linear)


# --------------------------------------------------------------------------- shrink / expand
@torch.library.custom_op("milp::lora_shrink", mutates_args=())
def lora_shrink_op(
    x: Tensor,
    lora_a: Tensor,
    lora_scale: Tensor,
    slots: Tensor,
    sorted_tokens: Tensor,
    tiles: Tensor,
    segments: Tensor,
    block_ms: list[int],
    max_rank: int,
) -> Tensor:
    check_lora_args(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank)
    with nvtx_range("milp.lora_shrink"):
        if backend_for(x) == "torch":
            return lora_shrink_torch(x, lora_a, lora_scale, slots, sorted_tokens, segments, max_rank)
        return lora_shrink(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank)


@lora_shrink_op.register_fake
def _(x: Tensor, lora_a: Tensor, lora_scale: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor,
      segments: Tensor, block_ms: list[int], max_rank: int) -> Tensor:
    check_lora_args(x, lora_a, lora_scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank, values=False)
    return x.new_empty(x.shape[0], max_rank, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("milp::lora_expand_", mutates_args=("y",))
def lora_expand_op(
    y: Tensor,
    t: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    sorted_tokens: Tensor,
    tiles: Tensor,
    segments: Tensor,
    block_ms: list[int],
) -> None:
    _check_expand_args(y, t, lora_b, slots, sorted_tokens, tiles, segments, block_ms)
    with nvtx_range("milp.lora_expand"):
        if backend_for(y) == "torch":
            lora_expand_torch_(y, t, lora_b, slots, sorted_tokens, segments)
            return
        lora_expand_(y, t, lora_b, slots, sorted_tokens, tiles, segments, block_ms)


@lora_expand_op.register_fake
def _(y: Tensor, t: Tensor, lora_b: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor, segments: Tensor,
      block_ms: list[int]) -> None:
    _check_expand_args(y, t, lora_b, slots, sorted_tokens, tiles, segments, block_ms, values=False)
    return None


def _check_expand_args(y: Tensor, t: Tensor, lora_b: Tensor, slots: Tensor, sorted_tokens: Tensor, tiles: Tensor,
                       segments: Tensor, block_ms: list[int], values: bool = True) -> None:
    """The arguments of ``milp::lora_expand_`` (``values=False``: its fake impl)."""
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("t", t, shape=(y.shape[0], None), dtypes=(acc_dtype(y.dtype),), device=y.device)
    if not (_unit_last(y) and _unit_last(t)):
        raise ValueError("y and t must have unit stride in their last dimension")
    # lora_b plays lora_a's role in the shared checks: [cap, N] rows against y's N columns
    check_lora_args(y, lora_b, None, slots, sorted_tokens, tiles, segments, block_ms, t.shape[1], values=values,
                    names=("y", "lora_b", "t's columns (max_rank)"))
