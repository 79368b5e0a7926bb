"""milp::lora_expand_ (in place) against float64."""
import pytest
import torch

from kernels import lora_expand_
from kernels.reference import expand_ref

from .cases import DTYPES, TOL, make_case, mixed_ranks, rel_err


def _check(case, dtype, device):
    bank = case.bank
    T, N = case.x.shape[0], bank.out_features
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(T)
    t = torch.randn(T, bank.max_rank, generator=g, dtype=torch.float64).to(device=device, dtype=acc)
    y0 = torch.randn(T, N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = y0.clone()
    ptr = y.data_ptr()
    out = lora_expand_(y, t, bank, case.plan)
    assert out.data_ptr() == ptr  # in place
    ref = expand_ref(y0, t, bank.lora_b, bank.slots, case.ids)
    assert rel_err(y, ref) < TOL[dtype]
    # rows whose user has no adapter are untouched, bit for bit
    ranks = torch.where(case.ids >= 0, bank.slots[case.ids.clamp(min=0).long(), 1].cpu(), 0)
    untouched = (ranks == 0).to(y.device)
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65, 257])
def test_expand_odd_sizes(backend, device, dtype, T):
    case = make_case(T, 8, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40]}, max_users=7, dtype=dtype, seed=T,
                     device=device)
    _check(case, dtype, device)


@pytest.mark.parametrize("users", [1, 64])
def test_expand_mixed_ranks_up_to_256(backend, device, users):
    ranks = mixed_ranks(users, seed=5) if users > 1 else {0: [256]}
    case = make_case(150, 8, 45, ranks, max_users=users, seed=users, device=device)
    _check(case, torch.float32, device)


def test_expand_all_base(backend, device):
    case = make_case(9, 8, 20, {0: [4]}, max_users=2, ids=torch.full((9,), -1), device=device)
    _check(case, torch.float32, device)
