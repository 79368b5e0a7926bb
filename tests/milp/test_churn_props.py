"""A long-running runtime under churn (store loads and evictions, batches of ever new shapes):
what it holds grows with what is loaded now, not with the iterations, the users or the batch
shapes seen so far. Each test compares N iterations with 4N."""
from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.runtime import MilpRuntime
from milp.store import UserStore, user_dirname

PAD = 0


def _store(root, n: int) -> list:
    """``n`` saved users (str and int ids, two layouts) in ``root``."""
    writer = MilpRuntime(tiny_model("llama"), max_users=1)
    users = []
    for i in range(n):
        u = f"user-{i}" if i % 2 else i
        writer.add_user(u, MemoryConfig.uniform(2, 1 + i % 2, 4), init="random", seed=i)
        writer.save_user(u, root / user_dirname(u))
        writer.remove_user(u)
        users.append(u)
    return users


def test_store_loads_do_not_grow_memory(tmp_path):
    """Was: every user loaded from the store (and every ``load_user``) read its safetensors files
    with ``safetensors.torch.load_file``, whose mmap reader (safetensors 0.8) keeps ~56 bytes per
    tensor alive after each call: a server swapping users through a few slots grew by ~2 KB per
    load of a tiny user (~40 KB for SmolLM2's), for good. Now the files are read from their bytes:
    3N more loads hold no more memory than the first N left."""
    users = _store(tmp_path, 6)
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(tmp_path, write_back=True))
    ids = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(0))

    def churn(steps: int, start: int) -> None:
        for i in range(start, start + steps):  # 2 slots, 6 users in turn: two loads a batch
            with torch.no_grad():
                rt.forward(ids, [users[(2 * i) % 6], users[(2 * i + 1) % 6]])

    N = 12
    tracemalloc.start()
    try:
        churn(N, 0)
        gc.collect()
        loads, after_n = rt.cache_info().loads, tracemalloc.get_traced_memory()[0]
        churn(3 * N, N)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - after_n
    finally:
        tracemalloc.stop()
    assert rt.cache_info().loads - loads >= 70  # 72 users loaded in the 3N iterations
    # before: ~190 KB more (2.6 KB a load, linear); after: what warms up once (~40 KB), then flat
    assert grown < 96 * 1024, f"{grown} bytes more after {rt.cache_info().loads - loads} more loads"


@pytest.mark.filterwarnings("ignore")
def test_static_plans_stay_bounded_over_batch_shapes():
    """Was: ``generate`` with a static cache registered a static plan for every decode batch size
    and every chunked-prefill length it met (``MilpState.prepare_static``), and kept each for good:
    ``set_users`` rewrites every registered plan, so a server meeting ever new prompt lengths paid
    one more plan update per batch for each length seen. Now at most ``max_static_plans`` stay
    registered (the least recently registered goes): after 4N calls as many as after N, and the
    decoded tokens are the eager ones."""
    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    rt.add_user("a", MemoryConfig.uniform(2, 1, 4), init="random", seed=0)
    rt.add_user(7, MemoryConfig((True, False), (2, 0), (4, 4)), init="random", seed=1)
    rt.model.generation_config.eos_token_id = None
    state = rt.state
    state.max_static_plans = 6
    gen = dict(max_new_tokens=1, do_sample=False, pad_token_id=PAD)

    def churn(steps: int, start: int) -> int:
        """``steps`` calls, each with a prompt length (a prefill chunk) not seen before; returns
        the plan updates one more batch costs."""
        for i in range(start, start + steps):
            rows = 1 + i % 3
            ids = torch.randint(3, 90, (rows, 2 + i), generator=torch.Generator().manual_seed(i))
            users = ["a", 7, None][:rows]
            got = rt.generate(ids, users, cache_implementation="static", prefill_chunk_size=128, **gen)
            assert got.tolist() == rt.generate(ids, users, **gen).tolist()
        before = state.plan_builds
        with rt.using([None]):  # a one-row batch: every registered plan of one row is rewritten
            pass
        return state.plan_builds - before

    N = 8
    cost_n, plans_n = churn(N, 0), len(state._static_plans)
    cost_4n, plans_4n = churn(3 * N, N), len(state._static_plans)
    assert plans_4n == plans_n <= 6
    assert cost_4n <= cost_n
    assert ("cpu", None, (1 + (4 * N - 1) % 3, 1)) in state._static_plans  # the last call's decode shape


def test_a_static_plan_registered_by_hand_is_never_dropped():
    """Only ``generate``'s plans (``evictable=True``) count toward ``max_static_plans``: a plan a
    caller registered for a CUDA graph it captured keeps being rewritten by ``set_users`` whatever
    ``generate`` registers after it (dropped, the graph would read a stale or freed plan)."""
    from milp.inject import apply_milp

    st = apply_milp(tiny_model("llama"), max_users=2)
    st.add_adapters(0, {0: (4,)}, init="random")
    st.max_static_plans = 2
    mine = st.prepare_static((2, 1))
    for rows in range(1, 6):
        st.prepare_static((rows, 3), evictable=True)
    st.prepare_static((4, 3))  # an evictable shape registered by hand: pinned from now on
    for rows in range(1, 6):
        st.prepare_static((rows, 5), evictable=True)
    kept = {lead for _, _, lead in st._static_plans}
    assert {(2, 1), (4, 3), (4, 5), (5, 5)} == kept
    assert st._static_plans[("cpu", None, (2, 1))] is mine
    st.set_users([-1, 0])
    assert mine.token_user_host().tolist() == [-1, 0]
    with pytest.raises(TypeError, match="evictable must be a bool"):
        st.prepare_static((1, 1), evictable="yes")


def test_peft_loads_do_not_grow_memory(tmp_path):
    """Was: ``load_peft`` read ``adapter_model.safetensors`` with ``safetensors.torch.load_file``
    (the leak of the store's loads above): ~0.9 KB more for good on every load of a tiny adapter.
    Now 3N more loads (and removals) hold no more memory than the first N left."""
    from milp.export import export_peft

    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    rt.add_user("u", MemoryConfig.uniform(2, 2, 4), init="random", seed=0)
    adapter = export_peft(rt, "u", tmp_path / "peft")

    def churn(steps: int) -> None:
        for _ in range(steps):
            rt.load_peft(adapter, "v")
            rt.remove_user("v")

    N = 30
    tracemalloc.start()
    try:
        churn(N)
        gc.collect()
        after_n = tracemalloc.get_traced_memory()[0]
        churn(3 * N)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - after_n
    finally:
        tracemalloc.stop()
    # before: ~95 KB more (linear in the loads); after: what warms up once (~15 KB), then flat
    assert grown < 48 * 1024, f"{grown} bytes more after {3 * N} more loads"
