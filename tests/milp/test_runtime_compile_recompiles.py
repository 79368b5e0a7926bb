"""A compiled injected model serving batch after batch: what re-traces and what does not.

Counted with a compile counter (``eager`` backend: Dynamo's work is what is counted):

* one registered batch shape (``MilpState.prepare_static``) is one graph, whatever the users
  of each batch: other mixes, rows without a user, users without adapters at a layer, users
  given per row or per token, users added and removed inside the banks' capacity and ranks;
* ``MilpRuntime.generate`` with a compiled decode step (static cache): one graph across calls
  with other users and other prompt lengths;
* what re-traces by design (documented on ``prepare_static`` and ``generate``): each other
  batch shape, dynamic shapes or not, since the static plan is looked up by shape.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from milp.config import MemoryConfig
from milp.inject import MilpState, batch_users, tiny_model
from milp.runtime import MilpRuntime, pad_sequences

PAD = 0


def _runtime() -> MilpRuntime:
    """Three users: "a" on both layers, "b" on layer 0 only (none at layer 1), "c" with no
    adapter at all; capacity for every later add without growing a bank."""
    rt = MilpRuntime(tiny_model("llama"), max_users=4, capacity=64)
    rt.add_user("a", MemoryConfig.uniform(2, 1, 4), init="random", seed=0)
    rt.add_user("b", MemoryConfig((True, False), (2, 0), (4, 4)), init="random", seed=1)
    rt.add_user("c", MemoryConfig((False, False), (0, 0), (8, 8)))
    rt.model.generation_config.eos_token_id = None
    return rt


def _compiled(model):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter


def test_users_per_row_and_per_token_share_one_graph():
    """Was: under torch.compile the injected layers tested ``row_users is None``, which guards on
    the users tensor's shape, so per-token users ``[B, S]`` after per-row users ``[B]`` (the same
    activations, the same static plan) re-traced the model, and again on the way back. Now the
    layers read a bool (``MilpState.has_users``): one graph, the eager logits."""
    rt = _runtime()
    model, state = rt.model, rt.state
    state.prepare_static((3, 5))
    compiled, counter = _compiled(model)
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    a, b = rt.slot("a"), rt.slot("b")
    per_token = torch.tensor([[a] * 5, [-1, -1, b, b, b], [b, a, -1, a, b]])
    with torch.no_grad():
        for users in ([a, -1, b], per_token, [b, b, a], per_token.flip(0)):
            with batch_users(model, users):
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_one_graph_per_shape_whatever_the_users():
    """Batches of other users (rows without a user, a user without adapters, all rows without
    one), then users removed and added inside the banks' capacity and ranks: one graph for the
    registered shape, with the eager logits."""
    rt = _runtime()
    rt.state.prepare_static((3, 5))
    compiled, counter = _compiled(rt.model)
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(1))
    batches = (["a", "b", None], ["b", "b", "b"], [None, None, None], ["c", "a", "a"], ["c", "c", "c"])
    with torch.no_grad():
        for users in batches:
            with rt.using(users):
                torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
        rt.remove_user("a")
        rt.add_user("d", MemoryConfig((False, True), (0, 1), (4, 4)), init="random", seed=3)
        for users in (["d", "b", None], ["b", "d", "d"]):
            with rt.using(users):
                torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_each_batch_shape_is_a_graph_of_its_own():
    """Documented (``MilpState.prepare_static``, ``MilpRuntime.generate``): the static plan is
    looked up by the activations' shape, so each registered shape is a graph, also under
    ``dynamic=True`` (where a model without adapters would keep one graph for 2, 3 and 4
    rows); a shape seen before reuses its graph."""
    assert "One graph per shape" in MilpState.prepare_static.__doc__
    assert "traces a graph of its own" in MilpRuntime.generate.__doc__
    rt = _runtime()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(rt.model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (2, 3, 4, 2, 3):
            rt.state.prepare_static((rows, 5))
            ids = torch.randint(3, 90, (rows, 5), generator=torch.Generator().manual_seed(rows))
            with rt.using((["a", None, "b"] * 2)[:rows]):
                torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 3


@pytest.mark.filterwarnings("ignore")
def test_compiled_decode_is_one_graph_across_generate_calls():
    """``generate`` with a static cache compiles the decode step (forced on CPU): calls with other
    users, other prompt lengths, and a user swapped for another of no larger rank in between,
    all decode with the first call's graph and give the eager tokens."""
    from transformers import CompileConfig

    rt = _runtime()
    cc = CompileConfig(fullgraph=True, backend="eager")
    cc._compile_all_devices = True  # transformers compiles on GPUs by itself, on CPU when told
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    calls = [([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], ["a", "b", None]),
             ([[5, 6, 7], [10, 11, 12], [13, 14]], ["b", "b", "c"]),
             ([[7, 8], [9, 10, 11, 12], [13]], [None, "a", "a"])]
    for i, (prompts, users) in enumerate(calls + [(calls[0][0], ["d", None, "b"])]):
        if i == len(calls):
            rt.remove_user("a")
            rt.add_user("d", MemoryConfig.uniform(2, 1, 4), init="random", seed=4)
        ids, mask = pad_sequences(prompts, PAD, side="left")
        want = rt.generate(ids, users, attention_mask=mask, **gen)
        got = rt.generate(ids, users, attention_mask=mask, cache_implementation="static", compile_config=cc, **gen)
        assert got.tolist() == want.tolist(), users
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_reserve_sizes_the_banks_so_that_users_come_and_go_without_a_retrace():
    """``MilpRuntime.reserve(configs)`` (what ``milp.serve --compile`` does before compiling):
    every bank gets rows for ``max_users`` users of the largest configuration at its layer and
    that configuration's total rank as ``max_rank``; a compiled forward traced then serves users
    of those configurations, added and removed in any order, from one graph, with no bank grown
    (no ``version`` bump) and no ``max_rank`` raised. Without it, users of a larger total rank
    arriving after smaller ones made it trace 3 graphs."""
    configs = [MemoryConfig.uniform(2, 2, 4), MemoryConfig((True, False), (1, 0), (8, 8)),
               MemoryConfig((False, True), (3, 3), (2, 2))]
    rt = MilpRuntime(tiny_model("llama"), max_users=3)
    rt.reserve(configs)
    banks = [m.bank for modules in rt.state.layers for m in modules]
    assert [b.max_rank for b in banks[:1]] == [8] and all(b.capacity >= 3 * 8 for b in banks)
    versions = [b.version for b in banks]
    compiled, counter = _compiled(rt.model)
    rt.state.prepare_static((3, 5))
    ids = torch.randint(3, 90, (3, 5))
    order = [("z", 2), ("y", 1), ("x", 0), ("x", None), ("w", 0), ("y", None), ("v", 2), ("z", None), ("u", 1)]
    for user, which in order:
        if which is None:
            rt.remove_user(user)
            continue
        rt.add_user(user, configs[which], init="random", seed=len(user))
        users = rt.users
        rows = (users * 3)[:3]
        with rt.using(rows), torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert [b.version for b in banks] == versions and [b.max_rank for b in banks[:1]] == [8]


def test_reserve_refuses_bad_input_by_name():
    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"users must be an int in \[1, max_users=2\]"):
            rt.reserve([MemoryConfig.uniform(2)], users=bad)
    with pytest.raises(TypeError, match="configs must be MemoryConfigs"):
        rt.reserve([])
    with pytest.raises(TypeError, match="configs must be MemoryConfigs"):
        rt.reserve([{"modules": 2}])
    with pytest.raises(ValueError, match="layer"):
        rt.reserve([MemoryConfig.uniform(3)])  # the model has 2 layers
    with pytest.raises(ValueError, match="max_rank"):
        rt.state.layers[0][0].bank.reserve(8, max_rank=-1)
