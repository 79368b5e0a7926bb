"""milp::lora_shrink (prefill tiles and decode split-K) against float64."""
import pytest
import torch

from kernels import lora_shrink
from kernels.reference import shrink_ref

from .cases import DTYPES, TOL, make_case, mixed_ranks, rel_err


def _check(case, dtype):
    bank = case.bank
    # new tensors filled with NaN (deterministic mode): every entry of t must be written,
    # zeros included, since the shrink allocates it without a zero-fill
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        t = lora_shrink(case.x, bank, case.plan)
    finally:
        torch.use_deterministic_algorithms(was)
    assert not t.isnan().any()
    ref = shrink_ref(case.x, bank.lora_a, bank.scale, bank.slots, case.ids, bank.max_rank)
    assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert t.shape == (case.x.shape[0], bank.max_rank)
    assert rel_err(t, ref) < TOL[dtype]
    # columns past each token's rank stay exactly zero
    ids = case.ids.cpu()
    ranks = torch.where(ids >= 0, bank.slots.cpu()[ids.clamp(min=0).long(), 1], 0)
    cols = torch.arange(bank.max_rank)
    assert (t.cpu()[cols[None, :] >= ranks[:, None]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65, 257])
def test_shrink_odd_sizes(backend, device, dtype, T):
    case = make_case(T, 45, 8, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40]}, max_users=7, dtype=dtype, seed=T,
                     device=device)
    _check(case, dtype)


@pytest.mark.parametrize("users", [1, 64])
def test_shrink_mixed_ranks_up_to_256(backend, device, users):
    ranks = mixed_ranks(users, seed=7) if users > 1 else {0: [256]}
    case = make_case(150, 33, 8, ranks, max_users=users, seed=users, device=device)
    _check(case, torch.float32)


def test_shrink_decode_split_k(backend, device):
    # one token per user and K long enough for the decode config to split K across programs
    ids = torch.arange(12)
    case = make_case(12, 2048, 8, mixed_ranks(12, seed=2, choices=(8, 16, 32, 64, 96)), max_users=12, ids=ids,
                     device=device)
    _check(case, torch.float32)


def test_shrink_all_base_and_empty_bank(backend, device):
    case = make_case(9, 16, 8, {0: [4]}, max_users=2, ids=torch.full((9,), -1), device=device)
    _check(case, torch.float32)
    case = make_case(9, 16, 8, {}, max_users=2, device=device)
    assert lora_shrink(case.x, case.bank, case.plan).shape == (9, 0)
