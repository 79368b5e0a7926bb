"""GPUs Triton does not support (NVIDIA compute capability below 8.0: V100, T4) take the torch
path under ``auto``, and the torch path's gather form, which decode and CUDA-graph capture take
there, reads nothing back on the host.

Triton supports "NVIDIA GPUs (Compute Capability 8.0+)" (its README). On sm_75 it still compiles
our kernels, without tensor cores (``python -m kernels.aot --arch 75``: every dot FMA, 12-14 KB
of spill stores in the fused GEMM in bf16/fp16), so ``auto`` ran them there before.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import AdapterBank, BatchPlan, _backend
from kernels.ops import _common, fused_linear
from kernels.reference import lora_linear_ref
from tests.kernels.test_host_syncs import CUDA, DEV, host_reads


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on ``cuda:0``: what ``backend_for`` reads of a tensor."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    """Set the compute capability ``backend_for`` sees (the cache cleared around the test)."""
    _backend._triton_supports.cache_clear()
    monkeypatch.setattr(torch.version, "hip", None)

    def set_to(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
        _backend._triton_supports.cache_clear()

    yield set_to
    monkeypatch.undo()
    _backend._triton_supports.cache_clear()


def _on_cuda() -> torch.Tensor:
    return torch.zeros(2).as_subclass(_OnCuda)


@pytest.mark.parametrize("cap, want", [((7, 0), "torch"), ((7, 5), "torch"), ((8, 0), "triton"),
                                       ((8, 6), "triton"), ((9, 0), "triton"), ((12, 0), "triton")])
def test_auto_runs_triton_from_compute_capability_8(capability, monkeypatch, cap, want):
    monkeypatch.setenv("MILP_KERNELS", "auto")
    capability(cap)
    assert kernels.triton_supports(0) is (want == "triton")
    assert kernels.backend_for(_on_cuda()) == want


def test_an_explicit_backend_wins_over_the_capability(capability, monkeypatch):
    capability((7, 5))
    monkeypatch.setenv("MILP_KERNELS", "triton")
    assert kernels.backend_for(_on_cuda()) == "triton"
    with kernels.use_backend("torch"):
        assert kernels.backend_for(_on_cuda()) == "torch"
    monkeypatch.setenv("MILP_KERNELS", "auto")
    with kernels.use_backend("triton"):
        assert kernels.backend_for(_on_cuda()) == "triton"
    assert kernels.backend_for(_on_cuda()) == "torch"


def test_rocm_gpus_run_triton(capability, monkeypatch):
    capability((7, 5))  # whatever the capability reads there: Triton's AMD backend
    monkeypatch.setattr(torch.version, "hip", "6.2")
    _backend._triton_supports.cache_clear()
    assert kernels.backend_for(_on_cuda()) == "triton"


def test_the_capability_is_read_once_per_device(capability, monkeypatch):
    """``backend_for`` runs on every op call: the capability is cached per device index."""
    calls = []

    def cap(index=None):
        calls.append(index)
        return (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", cap)
    _backend._triton_supports.cache_clear()
    for _ in range(5):
        kernels.backend_for(_on_cuda())
    assert calls == [0]


# ---------------------------------------------------------------- token_adapters, sync-free
def _token_adapters_loop(slots, sorted_tokens, segments, num_tokens):
    """The plain reading of the plan: each segment's tokens get its user's (offset, rank)."""
    off = torch.zeros(num_tokens, dtype=torch.long)
    rank = torch.zeros(num_tokens, dtype=torch.long)
    for start, end, user in segments.tolist():
        if user >= 0 and end > start:
            o, r = slots[user].tolist()
            off[sorted_tokens[start:end].long()] = o
            rank[sorted_tokens[start:end].long()] = r
    return off, rank


@settings(max_examples=60, deadline=None)
@given(data=st.data(), users=st.integers(1, 6), tokens=st.integers(0, 40), spare=st.integers(0, 9))
def test_token_adapters_match_the_plan_read_segment_by_segment(data, users, tokens, spare):
    """Any plan (base-only tokens, users without adapters, a plan with room for more tokens than
    the batch holds, the empty batch) gives the offsets and ranks of a loop over its segments."""
    bank = AdapterBank(4, 4, max_users=users, capacity=64)
    for u in range(users):
        if data.draw(st.booleans(), label=f"user {u} has adapters"):
            bank.add(u, data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label=f"ranks {u}"))
    ids = data.draw(st.lists(st.integers(-1, users - 1), min_size=tokens, max_size=tokens), label="ids")
    plan = BatchPlan(max(tokens + spare, 1), users).update(torch.tensor(ids, dtype=torch.long))
    want = _token_adapters_loop(bank.slots, plan.sorted_tokens, plan.segments, tokens)
    got = _common.token_adapters(bank.slots, plan.sorted_tokens, plan.segments, tokens)
    assert [t.tolist() for t in got] == [t.tolist() for t in want]


def _problem(tokens: int, users: int, k: int = 24, n: int = 40, dtype=torch.float32):
    g = torch.Generator().manual_seed(tokens * 31 + users)
    bank = AdapterBank(k, n, max_users=users, dtype=dtype, device=DEV)
    for u in range(users):
        if u % 4 != 3:  # every fourth user without adapters
            bank.add(u, [(2, 8, 16)[u % 3]] + [3] * (u % 2), alpha=8.0, init="random", generator=g)
    ids = torch.arange(tokens) % (users + 1) - 1  # a share of base-only tokens
    plan = BatchPlan.build(ids.to(DEV), users)
    x = torch.randn(tokens, k, generator=g).to(DEV, dtype)
    w = torch.randn(n, k, generator=g).to(DEV, dtype)
    return bank, plan, x, w, ids


@pytest.mark.parametrize("tokens, users", [(1, 1), (7, 4), (33, 12)])
@pytest.mark.parametrize("weighted", [True, False])
def test_the_device_gather_form_reads_nothing_back_and_gives_the_result(monkeypatch, tokens, users, weighted):
    """On a device the gather form computes ``max_rank`` columns (on CPU, the batch's largest
    rank): the same values, with no host read of device data (on a GPU: sync debug mode)."""
    bank, plan, x, w, ids = _problem(tokens, users)
    w = w if weighted else None
    sorted_tokens, _, segments, _ = plan.as_args()
    args = (x, w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, sorted_tokens, segments, bank.max_rank)
    cpu_y, cpu_t = fused_linear.fused_lora_linear_torch(*[a.cpu() if isinstance(a, torch.Tensor) else a
                                                          for a in args], store_t=True)
    if not CUDA:  # the rule a device tensor takes
        monkeypatch.setattr(fused_linear, "_gather_width", lambda x, rank, max_rank: max_rank)
    fused_linear.fused_lora_linear_torch(*args, store_t=True)  # first call outside (allocator, caches)
    with host_reads(monkeypatch) as rec:
        y, t = fused_linear.fused_lora_linear_torch(*args, store_t=True)
    if rec is not None:
        assert not rec.seen, dict(rec.seen)
    torch.testing.assert_close(y.cpu(), cpu_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.cpu(), cpu_t, rtol=0, atol=0)
    base = torch.zeros(bank.lora_b.shape[1], x.shape[1]) if w is None else w.cpu()
    ref = lora_linear_ref(x.cpu().double(), base.double(), None,
                          bank.lora_a.cpu().double(), bank.lora_b.cpu().double(), bank.scale.cpu().double(),
                          bank.slots.cpu(), ids)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA-graph capture needs a GPU")
def test_the_torch_path_captures_in_a_cuda_graph_above_the_gather_size(monkeypatch):
    """Under capture the torch path takes the gather form whatever its size (the loop over
    segments reads the plan on the host, which a capture refuses); replays follow new plans."""
    monkeypatch.setattr(fused_linear, "GATHER_MAX_ELEMENTS", 0)  # the loop form, outside capture
    bank, plan, x, w, ids = _problem(33, 12)
    static_plan = BatchPlan(33, 12, device=DEV).update(ids.to(DEV), validate=False, num_segments=13)
    with kernels.use_backend("torch"):
        want = kernels.lora_linear(x, w, None, bank, plan)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kernels.lora_linear(x, w, None, bank, static_plan)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = kernels.lora_linear(x, w, None, bank, static_plan)
        graph.replay()
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        other = torch.flip(ids, [0])
        static_plan.update(other.to(DEV), validate=False, num_segments=13)
        graph.replay()
        torch.testing.assert_close(y, kernels.lora_linear(x, w, None, bank, BatchPlan.build(other.to(DEV), 12)),
                                   rtol=1e-5, atol=1e-5)
