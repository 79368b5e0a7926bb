"""A runtime called from several threads (a server answering requests from a thread pool):
each call's batch runs on its own users' adapters.

The users' slots, the banks, the batch plan and the adapters' gradients are shared by every
call, so calls take turns (one lock per runtime). Before, a second thread's batch set its plan
while the first one's forward was still running: the first one's later layers ran the second
one's adapters, and the second one's ran none once the first one's block ended. Each race below
is made deterministic: forward pre-hooks hold one thread inside the model until the other one
is inside too (or a timeout says it could not get in).
"""
from __future__ import annotations

import threading

import pytest
import torch

from milp import MemoryConfig, MilpRuntime
from milp.inject import tiny_model

WAIT_S = 1.0  # how long a held thread waits for the other one (the locked case waits it out)


def runtime() -> MilpRuntime:
    torch.manual_seed(0)
    rt = MilpRuntime(tiny_model("llama"), max_users=4)
    for i, u in enumerate(("a", "b")):
        rt.add_user(u, MemoryConfig.uniform(2, 2, 4), init="random", seed=i)
    return rt


def mlp(rt: MilpRuntime, layer: int) -> torch.nn.Module:
    return rt.model.model.layers[layer].mlp


def run_interleaved(rt: MilpRuntime, first, second):
    """``first`` runs in thread A and is held in layer 1 until ``second`` (thread B) has
    entered layer 0; B is then held until A is done. Without the lock B's batch gets in
    while A's forward is half-way; with it, A's wait times out and B runs after A."""
    a_paused, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    out: dict[str, object] = {}

    def hold_a(module, args):
        if threading.current_thread().name == "A" and not a_paused.is_set():
            a_paused.set()
            b_inside.wait(WAIT_S)

    def hold_b(module, args):
        if threading.current_thread().name == "B" and not b_inside.is_set():
            b_inside.set()
            a_done.wait(WAIT_S)

    hooks = [mlp(rt, 1).register_forward_pre_hook(hold_a), mlp(rt, 0).register_forward_pre_hook(hold_b)]

    def thread_a():
        try:
            out["A"] = first()
        finally:
            a_done.set()

    def thread_b():
        a_paused.wait(WAIT_S)
        out["B"] = second()

    threads = [threading.Thread(target=thread_a, name="A"), threading.Thread(target=thread_b, name="B")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for h in hooks:
            h.remove()
    assert set(out) == {"A", "B"}, "a thread failed"
    return out["A"], out["B"]


def test_forwards_from_two_threads_run_their_own_users():
    rt = runtime()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    want_a = rt.forward(ids, ["a", "a"]).logits
    want_b = rt.forward(ids, ["b", None]).logits
    got_a, got_b = run_interleaved(rt, lambda: rt.forward(ids, ["a", "a"]).logits,
                                   lambda: rt.forward(ids, ["b", None]).logits)
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
    assert rt.state.row_users is None  # no batch left behind


def test_train_steps_from_two_threads_train_their_own_users():
    """Two threads training other users: each user's adapters are those of the same steps run
    one after the other (the banks' gradients and the optimizer are shared)."""
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = runtime()
    want = (ref.train_step(ids, ["a", "a"]), ref.train_step(ids, ["b", "b"]))
    rt = runtime()
    got = run_interleaved(rt, lambda: rt.train_step(ids, ["a", "a"]), lambda: rt.train_step(ids, ["b", "b"]))
    assert got == want
    for u in ("a", "b"):
        for k, v in ref.adapter_state(u).items():
            torch.testing.assert_close(rt.adapter_state(u)[k], v, rtol=0, atol=0)
        assert rt.optimizer.step_count(rt.slot(u)) == 1


def test_a_using_block_keeps_the_model_until_it_ends():
    """A thread's ``using()`` block holds the runtime: another thread's call waits for its end."""
    rt = runtime()
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(3))
    want_b = rt.forward(ids, ["b"]).logits
    entered, order = threading.Event(), []

    def other():
        entered.wait(WAIT_S)
        got = rt.forward(ids, ["b"]).logits
        order.append("b")
        torch.testing.assert_close(got, want_b, rtol=0, atol=0)

    t = threading.Thread(target=other)
    t.start()
    with rt.using(["a"]):
        entered.set()
        t.join(0.3)  # the other thread cannot get in while the block is open
        assert t.is_alive()
        order.append("a")
        assert rt.state.row_users is not None
    t.join(30)
    assert order == ["a", "b"]


def test_the_runtime_own_nested_calls_still_go_through():
    """The lock is re-entrant: a call inside the thread's own ``using()`` block runs (the
    runtime's nested batches, a forward inside a block)."""
    rt = runtime()
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(4))
    want = rt.forward(ids, ["b"]).logits
    with rt.using(["a"]):
        torch.testing.assert_close(rt.forward(ids, ["b"]).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["add_user", "forward", "train_step", "generate", "using", "load_user"])
def test_public_calls_take_the_lock(method):
    """Every call that reads or changes the shared state takes the runtime's lock (here: held by
    another thread, the call has not returned after 0.3 s)."""
    rt = runtime()
    ids = torch.randint(3, 90, (1, 4))

    def a_block():
        with rt.using(["a"]):
            pass

    calls = {
        "add_user": lambda: rt.add_user("c", MemoryConfig.uniform(2)),
        "forward": lambda: rt.forward(ids, ["a"]),
        "train_step": lambda: rt.train_step(ids, ["a"]),
        "generate": lambda: rt.generate(ids, ["a"], max_new_tokens=1, do_sample=False, pad_token_id=0),
        "using": a_block,
        "load_user": lambda: rt.load_user("/nonexistent-user-dir", "z"),
    }
    done = threading.Event()

    def call():
        try:
            calls[method]()
        except Exception:  # load_user of a missing folder: refused, but only once it has the lock
            pass
        done.set()

    with rt._lock:
        t = threading.Thread(target=call, daemon=True)
        t.start()
        assert not done.wait(0.3), f"{method} ran while another thread held the runtime"
    assert done.wait(30)
