"""CUDA-graph capture and replay across batches (needs a GPU; skipped on CPU)."""
import pytest
import torch

from kernels import AdapterBank, BatchPlan, lora_linear
from kernels.reference import lora_linear_ref
from kernels.tuning import use_dispatch

from .cases import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


# split (decode) and fused paths, and the split path with work on a side stream (the capture
# forks to it and joins back): the shrink beside the GEMM, and decode as two branches
SCHEDULES = {"32": (32, {}), "512": (512, {}),
             "512-overlap": (512, dict(decode_max_tokens=512, split_overlap_min_tokens=1,
                                       split_expand_first_max_tokens=0)),  # GEMM first: a GPU's file may say otherwise
             "32-parallel": (32, dict(split_parallel_max_tokens=32))}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_graph_replays_two_different_batches(schedule):
    T, knobs = SCHEDULES[schedule]
    with use_dispatch(**knobs):
        _graph_replays_two_different_batches(T)


def _graph_replays_two_different_batches(T):
    torch.manual_seed(0)
    K, N, U = 256, 384, 16
    bank = AdapterBank(K, N, max_users=U, dtype=torch.bfloat16, device="cuda")
    for u in range(0, U, 2):
        bank.add(u, [8, 16 * (u % 3 + 1)], init="random")
    w = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
    plan = BatchPlan(T, U, device="cuda")
    ids_in = torch.zeros(T, dtype=torch.int64, device="cuda")
    x_in = torch.zeros(T, K, dtype=torch.bfloat16, device="cuda")
    batches = []
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        ids = torch.randint(-1, U, (T,), device="cuda", generator=g)
        batches.append((ids, torch.randn(T, K, device="cuda", generator=g).bfloat16()))

    def step():
        plan.update(ids_in, validate=False)
        return lora_linear(x_in, w, None, bank, plan)

    ids_in.copy_(batches[0][0])
    x_in.copy_(batches[0][1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            step()  # warm-up: compile kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y_out = step()
    for ids, x in reversed(batches):  # replay a batch the graph was not captured with first
        ids_in.copy_(ids)
        x_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_linear_ref(x, w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, ids)
        assert rel_err(y_out, ref) < 2e-2
