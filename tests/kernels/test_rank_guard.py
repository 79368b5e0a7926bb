"""The kernels' memory-safety guard: a slot rank above the launch's ``max_rank``.

The op layer refuses such a slot on CPU and under ``MILP_DEBUG=1``; on a GPU it cannot see
it without reading device memory, so the kernels clamp each tile's rank to ``max_rank``
(``kernels.ops._common.load_tile_info``). Every launcher here is called with a ``max_rank``
below one user's rank and must give the result of that user's first ``max_rank`` rank rows,
with every other token's rows (and everything past ``t``) untouched. Before the clamp, the
shrink's and the fused kernel's ``t`` stores wrote past each row into the next token's, which
these comparisons catch. The over-rank user's tokens are never the last rows, so an unguarded
kernel corrupts neighbours (caught) rather than memory past the allocation.
"""
import pytest
import torch

from kernels import LaunchConfig
from kernels.ops.expand import lora_expand_, lora_expand_torch_
from kernels.ops.fused_linear import fused_lora_linear, fused_lora_linear_torch
from kernels.ops.grad_weights import lora_grad_weights, lora_grad_weights_torch
from kernels.ops.shrink import lora_shrink, lora_shrink_torch
from kernels.tuning import use_config

from .cases import make_case

MAX_RANK = 12  # not a power of two: blocks of 16 reach past it
DT = torch.float64  # exact comparisons: the reference is the torch path in the same dtype


@pytest.fixture(scope="module")
def case():
    # user 1 has rank 40 (> MAX_RANK) over two modules; users 0 and 2 fit. Tokens alternate
    # users, and the last tokens belong to user 2, so a store past a row lands in a neighbour.
    ids = torch.tensor([1, 0, 1, -1, 1, 2, 0, 1, 1, 2, 2])
    c = make_case(ids.numel(), 48, 40, {0: [8, 3], 1: [24, 16], 2: [16]}, max_users=4, dtype=DT, seed=3, ids=ids)
    assert int(c.bank.slots[1, 1]) == 40 and int(c.bank.slots[:, 1].max()) == 40
    return c


def _args(case):
    p = case.plan
    return p.sorted_tokens, p.tiles, p.segments, list(p.block_ms)


def _clamped(slots):
    out = slots.clone()
    out[:, 1] = out[:, 1].clamp(max=MAX_RANK)
    return out


SHRINK = {
    "split_k1": (LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=1), False),
    "atomic-split_k3": (LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3), False),
    "partials": (LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3), True),
    "block_r32-over-max_rank": (LaunchConfig(block_m=16, block_r=32, block_k=16, split_k=1), False),
    "atomic-block_r32": (LaunchConfig(block_m=16, block_r=32, block_k=16, split_k=3), False),
}


@pytest.mark.parametrize("name", list(SHRINK))
def test_shrink_clamps_rank(case, name):
    cfg, partials = SHRINK[name]
    bank = case.bank
    sorted_tokens, tiles, segments, block_ms = _args(case)
    with use_config("shrink", cfg):
        t = lora_shrink(case.x, bank.lora_a, bank.scale, bank.slots, sorted_tokens, tiles, segments, block_ms,
                        MAX_RANK, partials=partials)
    ref = lora_shrink_torch(case.x, bank.lora_a, bank.scale, _clamped(bank.slots), sorted_tokens, segments, MAX_RANK)
    if partials:  # only the columns the expand reads are written: those below each token's rank
        ids = case.ids.long()
        rank = torch.where(ids >= 0, _clamped(bank.slots)[ids.clamp(min=0), 1], 0)
        read = torch.arange(MAX_RANK)[None, :] < rank[:, None]
        t, ref = t.sum(0)[read], ref[read]
    torch.testing.assert_close(t, ref, rtol=1e-12, atol=1e-12)


EXPAND = {
    "tiles": LaunchConfig(block_m=16, block_n=16, block_r=16),
    "tiles-block_r32": LaunchConfig(block_m=16, block_n=16, block_r=32),
    "streaming": LaunchConfig(block_m=16, block_n=16, block_r=16, n_blocks=2),
    "gemv": LaunchConfig(block_m=16, block_n=16, split_n=2),
}


@pytest.mark.parametrize("name", list(EXPAND))
def test_expand_clamps_rank(case, name):
    bank = case.bank
    sorted_tokens, tiles, segments, block_ms = _args(case)
    g = torch.Generator().manual_seed(1)
    t = torch.randn(case.x.shape[0], MAX_RANK, generator=g, dtype=DT)
    y0 = torch.randn(case.x.shape[0], bank.out_features, generator=g, dtype=DT)
    y = y0.clone()
    with use_config("expand", EXPAND[name]):
        lora_expand_(y, t, bank.lora_b, bank.slots, sorted_tokens, tiles, segments, block_ms)
    ref = lora_expand_torch_(y0.clone(), t, bank.lora_b, _clamped(bank.slots), sorted_tokens, segments)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precompute_t", [False, True], ids=["fused", "fused_t"])
def test_fused_clamps_rank(case, precompute_t):
    bank = case.bank
    sorted_tokens, tiles, segments, block_ms = _args(case)
    cfg = LaunchConfig(block_m=16, block_n=16, block_k=16, block_r=16)
    with use_config("fused_linear", cfg), use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16)):
        y, t = fused_lora_linear(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                                 sorted_tokens, tiles, segments, block_ms, MAX_RANK, store_t=True,
                                 precompute_t=precompute_t)
    y_ref, t_ref = fused_lora_linear_torch(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale,
                                           _clamped(bank.slots), sorted_tokens, segments, MAX_RANK, store_t=True)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


def test_grad_weights_clamps_rank(case):
    bank = case.bank
    sorted_tokens, _, segments, _ = _args(case)
    g = torch.Generator().manual_seed(2)
    T = case.x.shape[0]
    dy = torch.randn(T, bank.out_features, generator=g, dtype=DT)
    t_bwd, t_fwd = (torch.randn(T, MAX_RANK, generator=g, dtype=DT) for _ in range(2))
    cap = bank.lora_a.shape[0]
    with use_config("grad_weights", LaunchConfig(block_n=16, block_r=16, block_k=16)):
        da, db = lora_grad_weights(case.x, dy, t_bwd, t_fwd, bank.slots, sorted_tokens, segments, cap, MAX_RANK)
    da_ref, db_ref = lora_grad_weights_torch(case.x, dy, t_bwd, t_fwd, _clamped(bank.slots), sorted_tokens, segments,
                                             cap)
    torch.testing.assert_close(da, da_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, db_ref, rtol=1e-12, atol=1e-12)
