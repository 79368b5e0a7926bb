"""milp::lora_expand_ (in place) against float64."""
import pytest
import torch

from kernels import LaunchConfig, aot, lora_expand_, use_backend
from kernels.reference import expand_ref
from kernels.tuning import use_config

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
    ids = case.ids.cpu()
    ranks = torch.where(ids >= 0, bank.slots.cpu()[ids.clamp(min=0).long(), 1], 0)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,ids", [(65, None), (7, "all-base"), (33, "partials")])
def test_expand_overwrite(backend, device, dtype, T, ids):
    """``accumulate=False`` (the split path's expand-first order): every row of ``y`` is
    written, ``t B`` for adapter tokens and exactly zero for the others; nothing is read."""
    from kernels.ops.expand import lora_expand_ as launch
    from kernels.ops.expand import lora_expand_torch_
    from kernels.ops.shrink import lora_shrink

    case = make_case(T, 24, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, dtype=dtype, seed=T, device=device,
                     ids=torch.full((T,), -1) if ids == "all-base" else None)
    bank, plan = case.bank, case.plan
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(T)
    if ids == "partials":  # the shrink's split-K partial sums, as the decode path passes them
        if backend != "triton":
            pytest.skip("split-K partials are the Triton shrink's")
        t = lora_shrink(case.x, bank.lora_a, bank.scale, bank.slots, plan.sorted_tokens, plan.tiles,
                        plan.segments, list(plan.block_ms), bank.max_rank, partials=True)
        t_full = t.sum(0) if t.dim() == 3 else t
    else:
        t = t_full = torch.randn(T, bank.max_rank, generator=g, dtype=torch.float64).to(device=device, dtype=acc)
    y = torch.full((T, bank.out_features), float("nan"), dtype=dtype, device=device)  # poison: all written?
    if backend == "triton":
        launch(y, t, bank.lora_b, bank.slots, plan.sorted_tokens, plan.tiles, plan.segments, list(plan.block_ms),
               accumulate=False)
    else:
        lora_expand_torch_(y, t, bank.lora_b, bank.slots, plan.sorted_tokens, plan.segments, accumulate=False)
    ref = expand_ref(torch.zeros_like(y), t_full, bank.lora_b, bank.slots, case.ids)
    assert not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype] if ref.abs().max() > 0 else torch.equal(y, ref)
    ids_cpu = case.ids.cpu()
    ranks = torch.where(ids_cpu >= 0, bank.slots.cpu()[ids_cpu.clamp(min=0).long(), 1], 0)
    assert (y[(ranks == 0).to(y.device)] == 0).all()


GEMV = LaunchConfig(block_m=16, block_n=32, split_n=3)  # odd split: the last program's columns run short
# the streaming form: a program takes n_blocks column blocks; 70 columns in blocks of 16 leave the
# last program of n_blocks=3 one block and a part (and a block wholly past N)
STREAM = LaunchConfig(block_m=16, block_n=16, block_r=16, n_blocks=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65])
def test_expand_gemv_form(device, dtype, T):
    """The decode (GEMV) form (``LaunchConfig.split_n > 0``): CUDA-core dots per column, one
    row at a time, against float64, with odd sizes and ranks 1-40 mixed."""
    case = make_case(T, 8, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40]}, max_users=7, dtype=dtype, seed=T,
                     device=device)
    with use_backend("triton"), use_config("expand", GEMV), aot.LaunchRecorder() as rec:
        _check(case, dtype, device)
    assert {r["kernel"] for r in rec.records.values()} == {"lora_expand_gemv"}


@pytest.mark.parametrize("users", [1, 64])
def test_expand_gemv_form_ranks_up_to_256(device, users):
    ranks = mixed_ranks(users, seed=5) if users > 1 else {0: [256]}
    case = make_case(150, 8, 45, ranks, max_users=users, seed=users, device=device)
    with use_backend("triton"), use_config("expand", GEMV):
        _check(case, torch.float32, device)


@pytest.mark.parametrize("form", ["gemv", "streaming"])
@pytest.mark.parametrize("ids", [None, "all-base"])
def test_expand_forms_overwrite_with_partials(device, ids, form):
    """Expand-first (``accumulate=False``) on the shrink's split-K partial sums, the decode path's
    inputs, in the GEMV and the streaming forms: every row written, zeros where there is no
    adapter."""
    from kernels.ops.expand import lora_expand_ as launch
    from kernels.ops.shrink import lora_shrink

    T = 33
    case = make_case(T, 48, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, dtype=torch.bfloat16, seed=T,
                     device=device, ids=torch.full((T,), -1) if ids else None)
    bank, plan = case.bank, case.plan
    with use_backend("triton"), use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3)):
        t = lora_shrink(case.x, bank.lora_a, bank.scale, bank.slots, plan.sorted_tokens, plan.tiles, plan.segments,
                        list(plan.block_ms), bank.max_rank, partials=True)
    assert t.dim() == 3 and t.shape[0] == 3
    y = torch.full((T, bank.out_features), float("nan"), dtype=torch.bfloat16, device=device)
    with use_backend("triton"), use_config("expand", GEMV if form == "gemv" else STREAM):
        launch(y, t, bank.lora_b, bank.slots, plan.sorted_tokens, plan.tiles, plan.segments, list(plan.block_ms),
               accumulate=False)
    ref = expand_ref(torch.zeros_like(y), t.sum(0), bank.lora_b, bank.slots, case.ids)
    assert not y.isnan().any()
    assert rel_err(y, ref) < TOL[torch.bfloat16] if ref.abs().max() > 0 else torch.equal(y, ref)




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65])
def test_expand_streaming_form(device, dtype, T):
    """``LaunchConfig.n_blocks > 1``: each program streams several column blocks with ``t``
    loaded once (ranks 1-40 mixed, within one rank block) against float64."""
    case = make_case(T, 8, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40]}, max_users=7, dtype=dtype, seed=T,
                     device=device)
    with use_backend("triton"), use_config("expand", STREAM), aot.LaunchRecorder() as rec:
        _check(case, dtype, device)
    (launch,) = rec.records.values()
    assert launch["kernel"] == "lora_expand"
    assert launch["constexprs"]["N_BLOCKS"] == 3 and launch["constexprs"]["HOIST_T"] is True
    assert launch["constexprs"]["BLOCK_R"] == 64  # the bank's rank (40) in one block


@pytest.mark.parametrize("users", [1, 64])
def test_expand_streaming_form_ranks_up_to_256(device, users):
    """Above a 128-row rank block ``t`` is not held: each column block walks the rank."""
    ranks = mixed_ranks(users, seed=5) if users > 1 else {0: [256]}
    case = make_case(150, 8, 45, ranks, max_users=users, seed=users, device=device)
    with use_backend("triton"), use_config("expand", STREAM), aot.LaunchRecorder() as rec:
        _check(case, torch.float32, device)
    assert {(r["constexprs"]["HOIST_T"], r["constexprs"]["BLOCK_R"]) for r in rec.records.values()} == {(False, 16)}
