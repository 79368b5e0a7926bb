"""Backward of milp::lora_linear: fused dx + grouped dA/dB against float64, and gradcheck."""
import pytest
import torch

from kernels import PATHS, AdapterBank, BatchPlan, lora_linear
from kernels.reference import lora_linear_grads_ref

from .cases import TOL, make_case, mixed_ranks, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _grads(case, dy, need_x=True, need_lora=True, path="auto"):
    bank = case.bank
    bank.zero_grad(set_to_none=True)
    bank.lora_a.requires_grad_(need_lora)
    bank.lora_b.requires_grad_(need_lora)
    x = case.x.clone().requires_grad_(need_x)
    y = lora_linear(x, case.w, case.b, bank, case.plan, path=path)
    (y * dy).sum().backward()
    return x.grad, bank.lora_a.grad, bank.lora_b.grad


def _check(case, dtype, device, seed=0, path="auto"):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(case.x.shape[0], case.w.shape[0], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    bank = case.bank
    dx_r, da_r, db_r = lora_linear_grads_ref(case.x, case.w, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                                             case.ids, dy)
    dx, da, db = _grads(case, dy, path=path)
    tol = TOL[dtype]
    assert rel_err(dx, dx_r) < tol
    assert rel_err(da, da_r) < tol
    assert rel_err(db, db_r) < tol
    # rows of users absent from the batch get exactly zero gradient
    present = set(case.ids.tolist())
    for u in bank.users:
        if u not in present:
            off, r = bank.slots[u].tolist()
            assert torch.count_nonzero(da[off : off + r]) == 0 and torch.count_nonzero(db[off : off + r]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65, 257])
def test_backward_odd_sizes(backend, device, dtype, T):
    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [32]}, max_users=7, dtype=dtype, seed=T,
                     device=device)
    _check(case, dtype, device, seed=T)


@pytest.mark.parametrize("path", PATHS)
def test_backward_every_path(backend, device, path):
    case = make_case(90, 33, 40, {0: [8, 3], 1: [100], 3: [1, 2, 5]}, max_users=5, seed=9, device=device)
    _check(case, torch.float32, device, path=path)


@pytest.mark.parametrize("T", [5, 96])
def test_split_path_with_the_shrink_beside_the_gemm(backend, device, T, monkeypatch):
    """``split_overlap``: the shrink (and the backward's grouped dA/dB) on a side stream beside
    the base GEMM (on a CPU, the same calls in program order) gives the serial schedule's
    forward and gradients, and the float64 reference's."""
    from kernels import library, tuning

    forks = []

    class Spy(library.SideStream):  # counts the forks: the overlapped schedule did run
        def __init__(self, device):
            forks.append(device)
            super().__init__(device)

    monkeypatch.setattr(library, "SideStream", Spy)
    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, seed=T, device=device)
    dy = torch.randn(T, 70, device=device)
    gemm_first = dict(split_expand_first_max_tokens=0)  # the overlap's order (a GPU's file may set expand-first)
    with tuning.use_dispatch(split_overlap_min_tokens=T + 1, **gemm_first):
        assert not tuning.split_overlap(T, case.x.device)
        serial = _grads(case, dy, path="split")
    assert not forks
    with tuning.use_dispatch(split_overlap_min_tokens=T, **gemm_first):
        assert tuning.split_overlap(T, case.x.device)
        overlapped = _grads(case, dy, path="split")
        # Triton: the forward and the backward's dx each forked once; the torch path has no split
        assert len(forks) == (2 if backend == "triton" else 0)
        _check(case, torch.float32, device, seed=T, path="split")
        y = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
    for got, want in zip(overlapped, serial, strict=True):
        assert rel_err(got, want) < 1e-6
    assert rel_err(y, lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")) < 1e-6


@pytest.mark.parametrize("users", [1, 64])
def test_backward_ranks_1_to_256_mixed(backend, device, users):
    ranks = mixed_ranks(users, seed=11) if users > 1 else {0: [256]}
    if users > 1:
        ranks[1] = [1, 255]
    case = make_case(200, 36, 40, ranks, max_users=users, seed=users, device=device)
    _check(case, torch.float32, device)


def test_backward_all_base_and_no_adapters(backend, device):
    case = make_case(20, 16, 24, {0: [4], 1: [8]}, max_users=2, ids=torch.full((20,), -1), device=device)
    _check(case, torch.float32, device)
    case = make_case(20, 16, 24, {}, max_users=2, device=device)
    dy = torch.randn(20, 24, device=device)
    dx, da, db = _grads(case, dy)
    torch.testing.assert_close(dx, dy @ case.w)
    assert da.shape == (0, 16) and db.shape == (0, 24)


def test_backward_only_inputs_or_only_adapters(backend, device):
    case = make_case(30, 16, 24, {0: [4], 1: [8]}, max_users=2, device=device)
    dy = torch.randn(30, 24, device=device, dtype=torch.float64).float()
    dx_full, da_full, db_full = _grads(case, dy)
    dx, da, db = _grads(case, dy, need_x=True, need_lora=False)
    assert da is None and db is None
    torch.testing.assert_close(dx, dx_full)
    dx, da, db = _grads(case, dy, need_x=False, need_lora=True)
    assert dx is None
    torch.testing.assert_close(da, da_full)
    torch.testing.assert_close(db, db_full)


def test_weight_and_bias_gradients(backend, device):
    case = make_case(30, 16, 24, {0: [4], 1: [8]}, max_users=2, device=device, dtype=torch.float64)
    w = case.w.clone().requires_grad_(True)
    b = case.b.clone().requires_grad_(True)
    x = case.x.clone().requires_grad_(True)
    y = lora_linear(x, w, b, case.bank, case.plan)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    torch.testing.assert_close(w.grad, dy.t() @ x.detach())
    torch.testing.assert_close(b.grad, dy.sum(0))


def test_gradcheck_float64(backend, device):
    torch.manual_seed(0)
    K, N, U = 6, 5, 4
    bank = AdapterBank(K, N, max_users=U, capacity=10, dtype=torch.float64, device=device)
    bank.add(0, [2, 3], init="random")
    bank.add(2, [4], init="random")
    bank.add(3, [1], alpha=3.0, init="random")
    ids = torch.tensor([0, 2, -1, 0, 3, 1, 2], device=device)
    plan = BatchPlan.build(ids, U)
    sorted_tokens, tiles, segments, block_ms = plan.as_args()

    def f(x, w, b, a, lb):
        y, _ = torch.ops.milp.lora_linear(x, w, b, a, lb, bank.scale, bank.slots, sorted_tokens, tiles, segments,
                                          block_ms, bank.max_rank, True)
        return y

    args = (
        torch.randn(7, K, dtype=torch.float64, device=device, requires_grad=True),
        torch.randn(N, K, dtype=torch.float64, device=device, requires_grad=True),
        torch.randn(N, dtype=torch.float64, device=device, requires_grad=True),
        bank.lora_a.detach().clone().requires_grad_(True),
        bank.lora_b.detach().clone().requires_grad_(True),
    )
    assert bank.capacity == 10  # every row is a user's: gradcheck perturbs all of them
    # the interpreter is slow: there, check random directional derivatives (fast mode)
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=fast)
