"""``torch.compile`` of code calling the ops: what re-traces and what does not.

A serving stack compiles once and then serves batches of changing size and users. Counted
with a compile counter (``eager``/``aot_eager`` backends: Dynamo's work is what is counted):

* a dynamic token count (marked, or made dynamic by torch on the second size) is never
  specialized by the wrappers (``lora_linear``, ``lora_shrink``, ``lora_expand_``);
* other users, other token counts, plans updated in place or rebuilt, ``plan.num_segments``,
  users added and removed inside the bank's capacity and ``max_rank``, every token without an
  adapter: at most the one re-trace torch makes to mark the token count dynamic;
* what re-traces by design (documented on :class:`kernels.AdapterBank`): a larger
  ``max_rank`` (an int the op takes) and every growth of the bank's capacity.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from kernels import AdapterBank, BatchPlan, lora_expand_, lora_linear, lora_shrink

from .conftest import DEVICE

K, N, USERS = 16, 24, 4

BATCHES = ([0, 2, -1, 0, 1], [2, 2, 0, 1, -1, 0, 0], [0] * 9, [-1, -1, -1, -1], [1, 3, 3], [3] * 11, [2, 0])


def _bank(capacity: int = 64, dtype: torch.dtype = torch.float32) -> AdapterBank:
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(K, N, max_users=USERS, capacity=capacity, dtype=dtype, device=DEVICE)
    bank.add(0, [4], init="random", generator=g)
    bank.add(2, [2, 3], init="random", generator=g)
    return bank


def _compiled(fn, backend: str = "eager"):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _ids(ids) -> torch.Tensor:
    return torch.tensor(ids, device=DEVICE)


def test_compiled_expand_takes_a_dynamic_token_count():
    """Was: ``lora_expand_`` compared y's rows with ``plan.num_tokens``, a Python int, also while
    compiling (``lora_linear``/``lora_shrink`` had stopped doing so), so a token count marked
    dynamic was refused (ConstraintViolationError: "your code specialized it to be a constant")
    and an unmarked one put a guard on the plan's token count. Now one graph serves every count."""
    bank = _bank()
    bank.requires_grad_(False)
    w = torch.randn(N, K, device=DEVICE)

    def f(x, plan):
        t = lora_shrink(x, bank, plan)
        return lora_expand_(x @ w.t(), t, bank, plan)

    fn, counter = _compiled(f)
    plan = BatchPlan(32, USERS, device=DEVICE)
    with torch.no_grad():
        for ids in BATCHES:
            plan.update(_ids(ids))
            x = torch.randn(len(ids), K, device=DEVICE)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(fn(x, plan), f(x, plan))
    assert counter.frame_count == 1


@pytest.mark.parametrize("variant", ["bias", "no-weight", "3-D", "path=split", "bf16"])
def test_one_graph_for_every_batch(variant):
    """Changing token counts and user mixes (every token without an adapter too), one plan
    updated in place, validated or not (``num_segments`` a count or ``None``): the first graph,
    plus at most the one where torch marks the token count dynamic."""
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    bank = _bank(dtype=dtype)
    bank.requires_grad_(False)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    if variant == "no-weight":
        def f(x, plan):
            return x @ w.t() + lora_linear(x, None, None, bank, plan)
    elif variant == "3-D":
        def f(x, plan):
            return lora_linear(x.reshape(1, -1, K), w, b, bank, plan).squeeze(0)
    else:
        path = "split" if variant == "path=split" else "auto"

        def f(x, plan):
            return lora_linear(x, w, b if variant == "bias" else None, bank, plan, path=path)

    fn, counter = _compiled(f)
    plan = BatchPlan(32, USERS, device=DEVICE)
    close = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    with torch.no_grad():
        for i, ids in enumerate(BATCHES):
            plan.update(_ids(ids), validate=i % 2 == 0)  # num_segments None when not validated
            x = torch.randn(len(ids), K, device=DEVICE, dtype=dtype)
            torch.testing.assert_close(fn(x, plan), f(x, plan), **close)
    assert counter.frame_count <= 2


def test_plans_built_per_batch_add_a_retrace_per_buffer_dimension():
    """A plan built per batch (:meth:`BatchPlan.build`) is sized by the batch: its token buffers
    follow the token count, and its segment table (``min(max_users, tokens) + 1`` rows) changes
    once batches have fewer tokens than ``max_users``; torch makes each such dimension dynamic
    at its second size, a re-trace each (documented there: compiled code keeps one plan and
    updates it). No more than that."""
    assert "re-trace" in BatchPlan.build.__doc__
    bank = _bank()
    bank.requires_grad_(False)
    w = torch.randn(N, K, device=DEVICE)
    f = lambda x, plan: lora_linear(x, w, None, bank, plan)  # noqa: E731
    fn, counter = _compiled(f)
    with torch.no_grad():
        for ids in BATCHES + BATCHES[::-1]:
            plan = BatchPlan.build(_ids(ids), USERS)
            x = torch.randn(len(ids), K, device=DEVICE)
            torch.testing.assert_close(fn(x, plan), f(x, plan))
    assert counter.frame_count == 3


def test_one_graph_for_training_batches():
    """Forward and backward (``aot_eager``) over batches of other sizes and users: the gradients
    of the eager calls, at most two graphs."""
    bank = _bank()
    w = torch.randn(N, K, device=DEVICE)

    def f(x, plan):
        return lora_linear(x, w, None, bank, plan).square().sum()

    fn, counter = _compiled(f, "aot_eager")
    plan = BatchPlan(32, USERS, device=DEVICE)
    for ids in BATCHES[:5]:
        plan.update(_ids(ids))
        x = torch.randn(len(ids), K, device=DEVICE)
        grads = []
        for g in (fn, f):
            bank.zero_grad()
            g(x, plan).backward()
            grads.append(bank.lora_a.grad.clone())
        torch.testing.assert_close(*grads)
    assert counter.frame_count <= 2


def _frozen_bank_compiled():
    """A frozen bank with rows to spare (capacity 64), a compiled ``lora_linear`` over it, a plan
    of users 0-3 and -1, and its input: ``(bank, w, fn, counter, plan, x)``."""
    bank = _bank(capacity=64)
    bank.requires_grad_(False)
    w = torch.randn(N, K, device=DEVICE)
    fn, counter = _compiled(lambda x, plan: lora_linear(x, w, None, bank, plan))
    plan = BatchPlan(8, USERS, device=DEVICE).update(_ids([0, 1, 2, 3, -1]))
    return bank, w, fn, counter, plan, torch.randn(5, K, device=DEVICE)


def test_users_coming_and_going_inside_capacity_and_max_rank_retrace_nothing():
    """``remove``/``add`` of users whose total rank is at most ``max_rank``, in a bank with rows
    to spare (no reallocation): the graph of the first batch serves them all."""
    bank, w, fn, counter, plan, x = _frozen_bank_compiled()
    with torch.no_grad():
        fn(x, plan)
        ptr = bank.lora_a.data_ptr()
        bank.remove(0)
        fn(x, plan)
        bank.add(1, [3], init="random")
        bank.add(3, [1, 1], init="random")
        fn(x, plan)
        bank.remove(2)
        bank.add(0, [5], init="random")
        torch.testing.assert_close(fn(x, plan), lora_linear(x, w, None, bank, plan))
    assert bank.lora_a.data_ptr() == ptr and counter.frame_count == 1


def test_what_retraces_by_design_is_the_rank_ceiling_and_a_growing_bank():
    """Documented on :class:`kernels.AdapterBank`: a user of a larger total rank than any before
    raises ``max_rank`` (an int the op takes: one new graph), and every growth of the capacity is
    one more (torch keeps parameter shapes static); back at a seen ``max_rank`` and capacity,
    nothing more."""
    import kernels.bank

    assert "re-traces when the bank grows" in kernels.bank.__doc__
    bank, w, fn, counter, plan, x = _frozen_bank_compiled()
    with torch.no_grad():
        fn(x, plan)
        bank.add(1, [8], init="random")  # max_rank 5 -> 8
        fn(x, plan)
        assert counter.frame_count == 2
        bank.add(3, [8], init="random")  # same ceiling
        fn(x, plan)
        assert counter.frame_count == 2
        bank.reserve(128)
        fn(x, plan)
        bank.reserve(256)
        torch.testing.assert_close(fn(x, plan), lora_linear(x, w, None, bank, plan))
    assert counter.frame_count == 4
