"""Property-based fuzzing of forward and backward against the float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import PATHS, AdapterBank, BatchPlan, lora_linear, use_backend
from kernels.reference import lora_linear_grads_ref, lora_linear_ref
from kernels.tuning import LaunchConfig, use_config

from .cases import rel_err
from .conftest import DEVICE


@st.composite
def problems(draw):
    T = draw(st.integers(0, 90))
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    users = draw(st.integers(1, 12))
    none_share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    ranks = {}
    for u in range(users):
        if draw(st.booleans()) or u == 0:
            ranks[u] = draw(st.lists(st.integers(1, 160), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    return T, k, n, users, none_share, ranks, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["triton", "torch"]), st.sampled_from(("auto",) + PATHS), st.integers(1, 4))
def test_fuzz_forward_backward(problem, backend, path, split_k):
    """Forward + backward with autograd (the op, ``t`` kept), then an inference forward by a
    drawn path with the shrink's K split ``split_k`` ways (the split path then hands the
    split-K partial sums to the expand)."""
    T, k, n, users, none_share, ranks, seed = problem
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank(k, n, max_users=users, device=DEVICE)
    for u, r in ranks.items():
        bank.add(u, r, alpha=float(torch.randint(1, 32, (1,), generator=g)), init="random", generator=g)
    ids = torch.randint(0, users, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < none_share, torch.full_like(ids, -1), ids).to(DEVICE)
    plan = BatchPlan.build(ids, users)
    x = torch.randn(T, k, generator=g).to(DEVICE).requires_grad_(True)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(DEVICE)
    dy = torch.randn(T, n, generator=g).to(DEVICE)
    with use_backend(backend):
        y = lora_linear(x, w, None, bank, plan)
        (y * dy).sum().backward()
    ref = lora_linear_ref(x.detach(), w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, ids)
    dx_r, da_r, db_r = lora_linear_grads_ref(x.detach(), w, bank.lora_a, bank.lora_b, bank.scale, bank.slots, ids, dy)
    assert rel_err(y, ref) < 2e-5
    shrink_cfg = LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=split_k)
    with use_backend(backend), use_config("shrink", shrink_cfg), torch.no_grad():
        assert rel_err(lora_linear(x.detach(), w, None, bank, plan, path=path), ref) < 2e-5
    if T:
        assert rel_err(x.grad, dx_r) < 2e-5
    assert rel_err(bank.lora_a.grad, da_r) < 2e-5
    assert rel_err(bank.lora_b.grad, db_r) < 2e-5
