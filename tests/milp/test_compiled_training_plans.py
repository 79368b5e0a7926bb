"""Gradient accumulation across micro-batches through a ``torch.compile``d injected model.

``MilpState.set_users`` rewrites every registered static plan in place (one compiled graph per
shape, a captured CUDA graph stays valid). A training loop that sums the losses of two
micro-batches of the same shape with other users and calls one ``backward`` must still get the
first micro-batch's gradients from the first batch's plan. Was: the compiled graph saved the
static buffers themselves for the backward, so the second ``set_users`` made the backward fail
("modified by an inplace operation", eager / aot_eager / inductor backends); had autograd's
version check not caught it, batch 1's tokens would have been credited to batch 2's users. Now
a compiled forward under autograd saves a copy of the plan, and one without autograd (decode,
serving) reads the static buffers themselves: no copy.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.runtime import MilpRuntime

SHAPE = (2, 5)
_G = torch.Generator().manual_seed(0)
IDS = [torch.randint(3, 90, SHAPE, generator=_G) for _ in range(2)]
# two micro-batches of one shape with other users: "a" only in the first, "b" in other rows
USERS = [["a", "b"], ["b", None]]


def _runtime() -> MilpRuntime:
    rt = MilpRuntime(tiny_model("llama"), max_users=4, capacity=64)
    rt.add_user("a", MemoryConfig.uniform(2, 1, 4), init="random", seed=0)
    rt.add_user("b", MemoryConfig.uniform(2, 1, 4), init="random", seed=1)
    return rt


def _params(rt: MilpRuntime) -> list[torch.Tensor]:
    return [p for b in rt.state.banks() for p in (b.lora_a, b.lora_b)]


def _accumulated_grads(rt: MilpRuntime, forward) -> list[torch.Tensor]:
    """Both micro-batches' forwards (each in its own ``using`` block), then one backward."""
    def loss(ids, users):
        with rt.using(users):
            logits = forward(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    total = sum(loss(ids, users) for ids, users in zip(IDS, USERS))
    total.backward()
    return [p.grad.clone() for p in _params(rt)]


def _assert_same(got, want):
    assert all(w.abs().max() > 0 for w in want)  # every adapter gets a gradient: the check has teeth
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def eager_grads():
    rt = _runtime()
    return _accumulated_grads(rt, rt.model)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_accumulated_micro_batches_with_a_static_plan_give_eager_gradients(backend, eager_grads):
    rt = _runtime()
    rt.state.prepare_static(SHAPE)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(rt.model, backend=counter, fullgraph=True)
    _assert_same(_accumulated_grads(rt, compiled), eager_grads)
    assert counter.frame_count == 1  # one graph for both micro-batches


def test_compiled_without_a_static_plan(eager_grads):
    """No static plan: with graph breaks the layers build their plans eagerly (the eager
    gradients); under ``fullgraph=True`` the trace fails, naming ``prepare_static``."""
    rt = _runtime()
    torch._dynamo.reset()
    _assert_same(_accumulated_grads(rt, torch.compile(rt.model, backend="aot_eager")), eager_grads)
    torch._dynamo.reset()
    compiled = torch.compile(rt.model, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as info, rt.using(USERS[0]):
        compiled(IDS[0])
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("prepare_static" in m for m in chain)


def test_train_step_and_loss_with_the_model_compiled_in_place(eager_grads):
    """The runtime's own paths with its model compiled in place (``nn.Module.compile``):
    ``loss`` of two micro-batches then one backward, and ``train_step`` batch after batch, as
    an eager runtime does."""
    rt, ref = _runtime(), _runtime()
    rt.state.prepare_static(SHAPE)
    torch._dynamo.reset()
    rt.model.base_model.compile(backend="aot_eager", fullgraph=True)  # what token_losses calls
    total = sum(rt.loss(ids, users)[0] for ids, users in zip(IDS, USERS))
    total.backward()
    want = sum(ref.loss(ids, users)[0] for ids, users in zip(IDS, USERS))
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    _assert_same([p.grad for p in _params(rt)], [p.grad for p in _params(ref)])
    rt.optimizer.zero_grad()
    ref.optimizer.zero_grad()
    for ids, users in zip(IDS * 2, USERS * 2):
        got, exp = rt.train_step(ids, users), ref.train_step(ids, users)
        assert got == pytest.approx(exp, rel=1e-5, abs=1e-6)
    for u in ("a", "b"):
        mine, theirs = rt.adapter_state(u), ref.adapter_state(u)
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-6, msg=f"{u}: {k}")


def test_serving_reads_the_static_buffers_and_training_a_copy():
    """Without autograd (decode, serving) the compiled graph reads the static plan itself: no
    copy op in it; under autograd it copies the plan once per injected layer. Both give the
    eager logits."""
    rt = _runtime()
    rt.state.prepare_static(SHAPE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(rt.model, backend=backend, fullgraph=True)

    def snapshots(gm) -> int:
        return sum("static_plan_snapshot" in str(n.target) for n in gm.graph.nodes)

    with torch.no_grad():
        for ids, users in zip(IDS, USERS):
            with rt.using(users):
                torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and snapshots(graphs[0]) == 0
    for ids, users in zip(IDS, USERS):
        with rt.using(users):
            torch.testing.assert_close(compiled(ids).logits, rt.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2 and snapshots(graphs[1]) == len(list(rt.state.modules()))
