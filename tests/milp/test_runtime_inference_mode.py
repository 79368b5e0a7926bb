"""The runtime used under ``torch.inference_mode()`` (what serving stacks run in) and then outside
it (``no_grad`` generation, training) by the same process: nothing it keeps across calls (batch
plans, adapter banks, optimizer state loaded from a store) may be an inference tensor, which
outside inference mode cannot be updated in place or saved for backward."""
from __future__ import annotations

import torch

from milp.config import MemoryConfig
from milp.decode import ContinuousBatch
from milp.inject import tiny_model
from milp.runtime import MilpRuntime
from milp.store import UserStore, user_dirname

IDS = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))


def make(max_users: int = 4, **kw) -> MilpRuntime:
    rt = MilpRuntime(tiny_model("llama"), max_users=max_users, **kw)
    return rt


def add(rt: MilpRuntime) -> MilpRuntime:
    rt.add_user("a", MemoryConfig.uniform(2, modules=2, rank=4), init="random", seed=0, total_steps=10)
    rt.add_user("b", MemoryConfig.uniform(2, modules=1, rank=8), init="random", seed=1, total_steps=10)
    return rt


def test_a_plan_made_under_inference_mode_is_reused_outside_it():
    rt, ref = add(make()), add(make())
    with torch.inference_mode():
        rt.forward(IDS[:, :1], ["a", None])  # the decode-sized plan is made here
    with torch.no_grad():  # the same size, other users: the plan is updated in place
        got = rt.forward(IDS[:, :1], ["b", "a"]).logits
        want = ref.forward(IDS[:, :1], ["b", "a"]).logits
    torch.testing.assert_close(got, want)
    out = rt.generate(IDS, ["a", "b"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.generate(IDS, ["a", "b"], max_new_tokens=3, do_sample=False, pad_token_id=0).tolist()


def test_users_loaded_from_a_store_under_inference_mode_train_outside_it(tmp_path):
    writer = add(make())
    for u in ("a", "b"):
        writer.save_user(u, tmp_path / user_dirname(u))
    rt = make(max_users=1, store=UserStore(tmp_path, write_back=True))
    with torch.inference_mode():
        rt.forward(IDS, "a")  # loads a (banks and optimizer state grow here)
        rt.forward(IDS, "b")  # evicts a, loads b
    losses = rt.train_step(IDS, "b")
    assert set(losses) == {"b"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ref = make(max_users=1, store=UserStore(tmp_path))
    assert losses == ref.train_step(IDS, "b")


def test_a_continuous_batch_under_inference_mode_leaves_the_runtime_usable():
    rt = add(make())
    batch = ContinuousBatch(rt.model, runtime=rt, eos_token_id=[])
    batch.join(0, [5, 6, 7], 4, "a")
    batch.join(1, [8, 9], 4, "b")
    with torch.inference_mode():
        while len(batch):
            batch.step()
    rt.generate(IDS, ["a", "b"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    rt.train_step(IDS, ["b", "a"])
