"""Forward of milp::lora_linear (fused kernel, decode path, torch path) against float64."""
import pytest
import torch

from kernels import DECODE_MAX_TOKENS, FUSED_MAX_RANK, PATHS, choose_path, lora_linear
from kernels.reference import lora_linear_ref

from .cases import DTYPES, TOL, make_case, mixed_ranks, rel_err


def _check_forward(case, dtype, path="auto"):
    y = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path=path)
    bank = case.bank
    ref = lora_linear_ref(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, case.ids)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) < TOL[dtype]
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65, 257])
def test_odd_sizes_mixed_ranks(backend, device, dtype, T):
    # k, d not multiples of 16; several modules per user; users without adapters; -1 tokens
    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [32]}, max_users=7, dtype=dtype,
                     seed=T, device=device)
    _check_forward(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("users", [1, 64])
def test_ranks_1_to_256_mixed_in_one_batch(backend, device, dtype, users):
    ranks = mixed_ranks(users, seed=users) if users > 1 else {0: [256]}
    if users > 1:
        ranks[0] = [1, 256]  # both extremes present
    case = make_case(200, 40, 36, ranks, max_users=users, dtype=dtype, none_share=0.1, seed=3, device=device)
    assert case.bank.max_rank > FUSED_MAX_RANK  # exercises the precomputed-t path
    _check_forward(case, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("max_rank", [16, 96, 200])
def test_every_path_and_rank_block(backend, device, path, max_rank):
    # every path must be right for any rank, whichever choose_path would pick
    case = make_case(130, 33, 50, {0: [max_rank], 1: [3]}, max_users=3, seed=max_rank, device=device)
    _check_forward(case, torch.float32, path)


@pytest.mark.parametrize("max_rank, load_t", [(96, False), (200, True)])
def test_fused_path_keeps_t_in_registers_only_up_to_its_tile_limit(device, max_rank, load_t):
    """``path="fused"`` with a rank past ``FUSED_MAX_BLOCK_R`` runs as ``fused_t``: a 256-wide
    ``t`` tile needs more shared memory than an A100 has, and spills 100 KB a thread in fp32."""
    from kernels import aot, use_backend
    from kernels.tuning import FUSED_MAX_BLOCK_R

    assert 96 <= FUSED_MAX_BLOCK_R < 256
    case = make_case(70, 33, 50, {0: [max_rank], 1: [3]}, max_users=2, seed=1, device=device)
    with aot.LaunchRecorder() as rec, use_backend("triton"):
        _check_forward(case, torch.float32, "fused")
    fused = [r for r in rec.records.values() if r["kernel"] == "fused_lora_linear"]
    assert len(fused) == 1 and fused[0]["constexprs"]["LOAD_T"] is load_t
    assert fused[0]["constexprs"]["BLOCK_R"] <= FUSED_MAX_BLOCK_R


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,bias", [(77, False), (5, False), (40, True)])
def test_split_path_expand_first(backend, device, monkeypatch, dtype, T, bias):
    """The split path's expand-first order (``split_expand_first``: the expand writes ``t B``,
    cuBLAS adds ``x Wᵀ``) gives the same forward and gradients; with a bias it keeps the
    GEMM-first order."""
    from kernels import aot, tuning

    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, dtype=dtype, bias=bias, seed=T,
                     device=device)
    monkeypatch.setattr(tuning, "SPLIT_EXPAND_FIRST_MAX_TOKENS", T)  # the knob's default, no config file
    assert tuning.split_expand_first(T) and not tuning.split_expand_first(T + 1)
    with aot.LaunchRecorder() as rec, tuning.use_dispatch(split_expand_first_max_tokens=T):  # over a GPU's file
        y = _check_forward(case, dtype, "split")
    if backend == "triton":  # which order ran: the expand overwrites y only without a bias
        modes = {r["constexprs"]["ACCUMULATE"] for r in rec.records.values() if r["kernel"] == "lora_expand"}
        assert modes == {bias}
    x = case.x.clone().requires_grad_(True)
    a, b = case.bank.lora_a, case.bank.lora_b
    a.requires_grad_(True)
    b.requires_grad_(True)
    try:
        with tuning.use_dispatch(split_expand_first_max_tokens=T):
            lora_linear(x, case.w, case.b, case.bank, case.plan, path="split").backward(torch.ones_like(y))
        grads = [x.grad, a.grad, b.grad]
        x.grad = a.grad = b.grad = None
        with tuning.use_dispatch(split_expand_first_max_tokens=0):
            lora_linear(x, case.w, case.b, case.bank, case.plan, path="split").backward(torch.ones_like(y))
        for got, want in zip(grads, [x.grad, a.grad, b.grad], strict=True):
            assert rel_err(got, want) < TOL[dtype]
    finally:
        a.requires_grad_(False)
        b.requires_grad_(False)
        a.grad = b.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,bias", [(5, False), (40, True)])
def test_split_path_in_two_branches_under_graph_capture(device, monkeypatch, dtype, T, bias):
    """``split_parallel``: while a CUDA graph is captured (faked here, so that the interpreter
    runs it too), inference runs the shrink and an expand writing ``d = t B`` beside the base
    GEMM, then ``y += d``; the same forward as the serial schedule and float64. Eager calls and
    training keep their schedule."""
    from kernels import aot, library, tuning, use_backend

    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, dtype=dtype, bias=bias, seed=T,
                     device=device)

    def expand_modes(rec):
        return {r["constexprs"]["ACCUMULATE"] for r in rec.records.values() if r["kernel"].startswith("lora_expand")}

    with use_backend("triton"), tuning.use_dispatch(split_parallel_max_tokens=T, split_expand_first_max_tokens=0):
        assert tuning.split_parallel(T, case.x.device) and not tuning.split_parallel(T + 1, case.x.device)
        with torch.no_grad(), aot.LaunchRecorder() as rec:
            serial = _check_forward(case, dtype, "split")  # not capturing: the serial schedule
        assert expand_modes(rec) == {True}
        monkeypatch.setattr(library, "_capturing", lambda device: True)
        with torch.no_grad(), aot.LaunchRecorder() as rec:
            parallel = _check_forward(case, dtype, "split")
        assert expand_modes(rec) == {False}  # d = t B written beside the GEMM
        assert rel_err(parallel, serial) < TOL[dtype]
        x = case.x.clone().requires_grad_(True)
        with aot.LaunchRecorder() as rec:  # training keeps t for the backward: the serial schedule
            lora_linear(x, case.w, case.b, case.bank, case.plan, path="split")
        assert expand_modes(rec) == {True}


@pytest.mark.parametrize("path", PATHS)
def test_every_path_bf16_odd_sizes(backend, device, path):
    case = make_case(77, 45, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40]}, max_users=7, dtype=torch.bfloat16,
                     seed=5, device=device)
    _check_forward(case, torch.bfloat16, path)


def test_choose_path():
    assert choose_path(1, 96) == "split"
    assert choose_path(DECODE_MAX_TOKENS, 8) == "split"
    assert choose_path(4096, FUSED_MAX_RANK) == "fused"
    assert choose_path(4096, FUSED_MAX_RANK + 1) == "fused_t"
    # 256 users with one token each: segment-aligned tiles would re-read W per user
    assert choose_path(256, 96, num_segments=256) == "split"
    assert choose_path(4096, 96, num_segments=32) == "fused_t"


def test_bad_path(device):
    case = make_case(5, 8, 10, {0: [2]}, max_users=1, device=device)
    with pytest.raises(ValueError, match="path must be 'auto' or one of"):
        lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="fast")


def test_empty_segments_and_users_absent_from_batch(backend, device):
    # users 1 and 3 have adapters but no tokens; user 2 has tokens but no adapter here
    ids = torch.tensor([0, 2, 2, 0, -1, 0, 2])
    case = make_case(7, 20, 24, {0: [4], 1: [8], 3: [16]}, max_users=4, ids=ids, device=device)
    _check_forward(case, torch.float32)


@pytest.mark.parametrize("T", [1, 9, 100])
def test_all_tokens_without_adapter_is_the_base_linear(backend, device, T):
    case = make_case(T, 20, 24, {0: [4], 1: [8]}, max_users=2, ids=torch.full((T,), -1), device=device)
    y = _check_forward(case, torch.float32)
    torch.testing.assert_close(y, torch.nn.functional.linear(case.x, case.w, case.b), rtol=2e-5, atol=2e-5)


def test_no_adapter_in_bank(backend, device):
    case = make_case(33, 20, 24, {}, max_users=3, none_share=0.0, device=device)
    assert case.bank.max_rank == 0
    _check_forward(case, torch.float32)


def test_single_token(backend, device):
    case = make_case(1, 17, 19, {0: [5]}, max_users=1, ids=torch.tensor([0]), bias=False, device=device)
    _check_forward(case, torch.float32)


@pytest.mark.parametrize("T", [DECODE_MAX_TOKENS, DECODE_MAX_TOKENS + 1])
def test_decode_and_fused_paths_agree_at_the_boundary(backend, device, T):
    case = make_case(T, 48, 40, mixed_ranks(T, seed=1, choices=(8, 16, 32, 64, 96)), max_users=T,
                     ids=torch.arange(T), seed=T, device=device)  # one token per user: decode shape
    _check_forward(case, torch.float32)


@pytest.mark.slow
def test_real_llama_ffn_shape_decode(backend, device):
    # LLaMA-7B up_proj 4096 -> 11008, 3 users one token each
    ids = torch.tensor([0, 1, 2])
    case = make_case(3, 4096, 11008, {0: [8], 1: [16, 16], 2: [96]}, max_users=3, ids=ids,
                     dtype=torch.bfloat16, device=device)
    _check_forward(case, torch.bfloat16)


def test_leading_dims_are_flattened(backend, device):
    case = make_case(12, 16, 20, {0: [4], 1: [6]}, max_users=2, device=device)
    y = lora_linear(case.x.view(3, 4, 16), case.w, case.b, case.bank, case.plan)
    assert y.shape == (3, 4, 20)
    torch.testing.assert_close(y.reshape(12, 20), lora_linear(case.x, case.w, case.b, case.bank, case.plan))


def test_non_contiguous_input_is_handled(backend, device):
    case = make_case(10, 16, 20, {0: [4], 1: [6]}, max_users=2, device=device)
    wide = torch.randn(10, 32, device=device)
    wide[:, ::2] = case.x
    x_strided = wide[:, ::2]
    assert not x_strided.is_contiguous()
    torch.testing.assert_close(
        lora_linear(x_strided, case.w, case.b, case.bank, case.plan),
        lora_linear(case.x, case.w, case.b, case.bank, case.plan),
    )
    # a transposed weight view (GPT-2 Conv1D stores [in, out]) also works
    w_t = case.w.t().contiguous().t()
    assert not w_t.is_contiguous()
    torch.testing.assert_close(
        lora_linear(case.x, w_t, case.b, case.bank, case.plan),
        lora_linear(case.x, case.w, case.b, case.bank, case.plan),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_path_split_k_partials_and_atomics(backend, device, dtype):
    """The split path with K split 3 ways: without autograd the shrink leaves its partial sums
    for the expand to add (no zero-fill, no atomics: bitwise reproducible); with autograd it
    keeps ``t`` (atomics into a zeroed t). Both against float64; empty and -1 segments too."""
    from kernels.tuning import LaunchConfig, use_config

    ids = torch.tensor([0, -1, 3, 3, 5, 0, -1, 6, 2])
    case = make_case(9, 100, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5], 5: [40], 6: [7]}, max_users=8, ids=ids,
                     dtype=dtype, seed=11, device=device)
    with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3, num_warps=4,
                                           num_stages=2)):
        with torch.no_grad():
            y1 = _check_forward(case, dtype, "split")
            y2 = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
        assert torch.equal(y1, y2)
        x = case.x.clone().requires_grad_(True)
        y = lora_linear(x, case.w, case.b, case.bank, case.plan, path="split")
        bank = case.bank
        ref = lora_linear_ref(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, case.ids)
        assert rel_err(y.detach(), ref) < TOL[dtype]
        y.float().square().sum().backward()
        assert torch.isfinite(x.grad).all()


EXPAND_FORMS = {  # the expand's entry of a config table, and the kernel it must launch
    "gemv": ({"block_m": 16, "block_n": 32, "split_n": 3}, "lora_expand_gemv"),
    "streaming": ({"block_m": 16, "block_n": 16, "block_r": 16, "n_blocks": 3}, "lora_expand"),
}


@pytest.mark.parametrize("form", EXPAND_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_path_with_an_expand_form_from_a_table(device, dtype, form, tmp_path, monkeypatch):
    """A config table that picks the expand's GEMV form (``split_n``) or its streaming form
    (``n_blocks``), as a tuned GPU file may: the split path's forward (on the shrink's split-K
    partial sums) and its gradients through ``lora_linear``, against float64."""
    import json

    from kernels import aot, use_backend
    from kernels.reference import lora_linear_grads_ref
    from kernels.tuning import _load_table

    table = tmp_path / "gpu.json"
    table.write_text(json.dumps({"ops": {
        "shrink": [{"max_tokens": None, "n": None, "k": None, "block_m": 16, "block_r": 16, "block_k": 16,
                    "split_k": 2}],
        "expand": [{"max_tokens": None, "n": None, "k": None, **EXPAND_FORMS[form][0]}]}}))
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(table))
    _load_table.cache_clear()
    case = make_case(24, 45, 70, {0: [8, 3], 2: [16], 3: [40]}, max_users=5, dtype=dtype, seed=4, device=device)
    a, b = case.bank.lora_a, case.bank.lora_b
    try:
        with use_backend("triton"), aot.LaunchRecorder() as rec:
            with torch.no_grad():  # inference: the expand adds the shrink's split-K partial sums
                _check_forward(case, dtype, "split")
            x = case.x.clone().requires_grad_(True)
            a.requires_grad_(True)
            b.requires_grad_(True)
            dy = torch.randn(case.x.shape[0], case.w.shape[0], generator=torch.Generator().manual_seed(1))
            lora_linear(x, case.w, case.b, case.bank, case.plan, path="split").backward(dy.to(x))
        kernel = EXPAND_FORMS[form][1]
        expands = [r for r in rec.records.values() if r["kernel"].startswith("lora_expand")]
        assert {r["kernel"] for r in expands} == {kernel}
        assert {r["constexprs"]["SPLIT"] for r in expands} == {1, 2}  # the forward's partials, the backward's t
        if form == "streaming":
            assert {(r["constexprs"]["N_BLOCKS"], r["constexprs"]["HOIST_T"]) for r in expands} == {(3, True)}
        rdx, rda, rdb = lora_linear_grads_ref(case.x, case.w, a.detach(), b.detach(), case.bank.scale,
                                              case.bank.slots, case.ids, dy.to(x))
        for got, want in ((x.grad, rdx), (a.grad, rda), (b.grad, rdb)):
            assert rel_err(got, want) < TOL[dtype]
    finally:
        a.requires_grad_(False)
        b.requires_grad_(False)
        _load_table.cache_clear()


# ------------------------------------------------------------------------ the adapters alone
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 65])
def test_weight_none_gives_the_adapters_alone(backend, device, dtype, T):
    """``weight=None``: ``Σ s B A x`` (zeros for tokens without an adapter), to add to a base
    output computed elsewhere; the split path's kernels."""
    case = make_case(T, 45, 70, {0: [8, 3], 2: [16], 3: [1, 2, 5]}, max_users=6, dtype=dtype, seed=T,
                     device=device)
    bank = case.bank
    d = lora_linear(case.x, None, None, bank, case.plan)
    zero = torch.zeros_like(case.w)
    ref = lora_linear_ref(case.x, zero, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, case.ids)
    assert d.dtype == dtype and d.shape == ref.shape
    assert rel_err(d, ref) < TOL[dtype]
    none = (case.ids < 0).cpu()
    assert bool((d[none] == 0).all())  # tokens without an adapter: exactly zero
    base = torch.nn.functional.linear(case.x, case.w, case.b)
    full = lora_linear_ref(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, case.ids)
    assert rel_err(base + d, full) < 2 * TOL[dtype]


def test_weight_none_gradients_and_gradcheck(backend, device):
    """Gradients of the adapters alone, for ``x`` and the banks, against float64 autograd of the
    reference, and ``gradcheck`` of the op with ``weight=None``."""
    case = make_case(23, 9, 11, {0: [2, 3], 1: [4], 3: [1]}, max_users=4, dtype=torch.float64, seed=5,
                     device=device)
    bank = case.bank
    x = case.x.clone().requires_grad_(True)
    dy = torch.randn(23, 11, dtype=torch.float64, device=device)
    got = torch.autograd.grad(lora_linear(x, None, None, bank, case.plan), (x, bank.lora_a, bank.lora_b), dy)
    ref = lora_linear_ref(x, torch.zeros_like(case.w), None, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                          case.ids)
    want = torch.autograd.grad(ref, (x, bank.lora_a, bank.lora_b), dy)
    for name, a, b in zip(("dx", "dA", "dB"), got, want):
        assert rel_err(a, b) < TOL[torch.float64], name
    sorted_tokens, tiles, segments, block_ms = case.plan.as_args()

    def f(x, a, lb):
        return torch.ops.milp.lora_linear(x, None, None, a, lb, bank.scale, bank.slots, sorted_tokens, tiles,
                                          segments, block_ms, bank.max_rank, True)[0]

    args = (x.detach().requires_grad_(True), bank.lora_a.detach().clone().requires_grad_(True),
            bank.lora_b.detach().clone().requires_grad_(True))
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=fast)


def test_weight_none_refusals(device):
    case = make_case(9, 8, 10, {0: [2]}, max_users=1, device=device)
    with pytest.raises(ValueError, match="bias must be None when weight is None"):
        lora_linear(case.x, None, case.b, case.bank, case.plan)
    for path in ("fused", "fused_t"):
        with pytest.raises(ValueError, match=f"path='{path}' fuses the base GEMM; with weight=None"):
            lora_linear(case.x, None, None, case.bank, case.plan, path=path)
    assert lora_linear(case.x, None, None, case.bank, case.plan, path="split").shape == (9, 10)
