"""Multi-user runtime: joint training equals per-user training, mixed-user generation equals
per-user generation, save/load, the per-user AdamW, bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from milp.config import MemoryConfig
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model
from milp.optim import AdamWConfig, PackedAdamW, lr_multiplier, warmup_steps
from milp.runtime import MilpRuntime, pad_sequences, user_losses

PAD = 0

# three users with different layouts: all layers / first layer only / second layer only,
# shared and per-module ranks, different optimizer settings (one clipped)
USERS = {
    "a": (MemoryConfig.uniform(2, modules=2, rank=8), AdamWConfig(lr=1e-2, max_grad_norm=0.05), 4),
    "b": (MemoryConfig((True, False), (1, 0), (16, 8), lora_alpha=8.0), AdamWConfig(lr=5e-3, warmup_ratio=0.5), 6),
    7: (MemoryConfig((False, True), (0, 3), (8, (2, 4, 6)), lora_alpha=4.0),
        AdamWConfig(lr=2e-2, weight_decay=0.1, decay="constant"), 10),
}


def make_runtime(arch: str, users=USERS, max_users: int = 8, dtype: torch.dtype = torch.float32) -> MilpRuntime:
    rt = MilpRuntime(tiny_model(arch).to(dtype), max_users=max_users)
    for u, (cfg, opt, steps) in users.items():
        seed = 100 + list(USERS).index(u) if u in USERS else 99  # a user's init does not depend on the others
        rt.add_user(u, cfg, optim=opt, total_steps=steps, init="random", seed=seed)
    return rt


def user_data(seed: int, users, rows_per_user: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {u: [torch.randint(3, 90, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
                for _ in range(rows_per_user)] for u in users}


def joint_batch(data: dict):
    rows, users = [], []
    for i in range(max(len(v) for v in data.values())):  # interleave users
        for u, seqs in data.items():
            if i < len(seqs):
                rows.append(seqs[i])
                users.append(u)
    ids, mask = pad_sequences(rows, PAD, side="right")
    return ids, mask, users


# float32 on two architectures; float64 on every supported one, where joint training must match
# to rounding (in float32 Adam turns last-bit differences of near-zero gradients, summed in
# another order in a joint batch, into differences of ~1e-5 after 3 steps)
CASES = [("llama", torch.float32), ("gpt2", torch.float32)] + [(a, torch.float64) for a in SUPPORTED_ARCHITECTURES]


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_joint_training_equals_training_each_user_alone(arch, dtype):
    if arch == "roberta" and dtype == torch.float64 and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x builds RoBERTa's causal mask with float64's min in a float32 tensor "
                    "(modeling_attn_mask_utils: overflow); 5.x does not")
    joint = make_runtime(arch, dtype=dtype)
    alone = {u: make_runtime(arch, {u: USERS[u]}, dtype=dtype) for u in USERS}
    tol = dict(rtol=1e-4, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for step in range(3):
        data = user_data(step, USERS)
        ids, mask, users = joint_batch(data)
        joint_losses = joint.train_step(ids, users, attention_mask=mask)
        for u, rt in alone.items():
            ids_u, mask_u = pad_sequences(data[u], PAD, side="right")
            loss_u = rt.train_step(ids_u, [u] * len(data[u]), attention_mask=mask_u)
            assert joint_losses[u] == pytest.approx(loss_u[u], rel=1e-5, abs=1e-6)
    for u, rt in alone.items():
        assert joint.optimizer.step_count(joint.slot(u)) == 3
        mine, ref = joint.adapter_state(u), rt.adapter_state(u)
        assert mine.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], **tol, msg=f"user {u!r}: {k}")
        start = make_runtime(arch, {u: USERS[u]}, dtype=dtype).adapter_state(u)
        assert any((mine[k] - start[k]).abs().max() > 1e-3 for k in start)  # training moved them


def test_loss_is_sum_of_per_user_means():
    rt = make_runtime("llama")
    data = user_data(5, USERS)
    ids, mask, users = joint_batch(data)
    total, per_user = rt.loss(ids, users, attention_mask=mask)
    assert set(per_user) == set(USERS)
    torch.testing.assert_close(total, sum(per_user.values()))
    for u in USERS:
        ids_u, mask_u = pad_sequences(data[u], PAD)
        labels = ids_u.masked_fill(mask_u == 0, -100)
        logits = rt.forward(ids_u, u, attention_mask=mask_u).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(per_user[u], want, rtol=1e-5, atol=1e-6)


def test_losses_of_several_batches_share_one_backward():
    """Gradient accumulation: the forwards of two batches with other users (same shape, so
    the same plan bucket), then one backward, give the sum of the two batches' gradients —
    the first batch's plan must survive the second forward."""
    rt = make_runtime("llama")
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(4))
    batches = [(ids, ["a", "b"]), (ids.flip(0), [7, "a"])]

    params = [p for b in rt.state.banks() for p in (b.lora_a, b.lora_b)]

    def grads():
        return [p.grad.clone() for p in params]

    def zero():
        for p in params:
            p.grad = None

    separate = None
    for b_ids, b_users in batches:
        zero()
        rt.loss(b_ids, b_users)[0].backward()
        separate = grads() if separate is None else [a + g for a, g in zip(separate, grads())]
    zero()
    sum(rt.loss(b_ids, b_users)[0] for b_ids, b_users in batches).backward()
    for got, want in zip(grads(), separate):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_user_losses_ignores_base_rows_and_padding():
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [1, 2, 3, 4], [5, 5, 5, 5]])
    total, mean, count = user_losses(logits, labels, torch.tensor([1, 1, -1]), max_users=2)
    assert count.tolist() == [0, 5]
    ce = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 7), labels[:2, 1:].reshape(-1),
                                           ignore_index=-100)
    torch.testing.assert_close(total, ce)


def test_users_outside_the_batch_are_untouched():
    rt = make_runtime("llama")
    before = rt.adapter_state("b")
    data = user_data(0, ["a", 7])
    ids, mask, users = joint_batch(data)
    rt.train_step(ids, users, attention_mask=mask)
    after = rt.adapter_state("b")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rt.optimizer.step_count(rt.slot("b")) == 0
    assert rt.optimizer.step_count(rt.slot("a")) == 1
    # base rows (None) are allowed next to users and contribute no loss
    losses = rt.train_step(ids, [u if i % 2 else None for i, u in enumerate(users)], attention_mask=mask)
    assert None not in losses


def _new_tokens(out, prompt_len):
    return out[:, prompt_len:]


@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHITECTURES))
def test_mixed_greedy_generation_equals_per_user(arch):
    rt = make_runtime(arch)
    rt.model.generation_config.eos_token_id = None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18], [19, 20, 21]]
    users = ["a", "b", None, 7, "a"]
    pad = rt.model.config.pad_token_id
    ids, mask = pad_sequences(prompts, pad, side="left")
    out = rt.generate(ids, users, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for b, (p, u) in enumerate(zip(prompts, users)):
        one = rt.generate(torch.tensor([p]), [u], max_new_tokens=6, do_sample=False, pad_token_id=pad)
        assert out[b, ids.shape[1]:].tolist() == one[0, len(p):].tolist(), f"row {b} (user {u!r})"
    # the None row is the base model's own generation
    base = tiny_model(arch)
    base.generation_config.eos_token_id = None
    alone = base.generate(torch.tensor([prompts[2]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                          max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert out[2, ids.shape[1]:].tolist() == alone[0, 3:].tolist()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_static_cache_generation_compiles_once_for_every_batch(backend):
    """``generate`` with a static cache: transformers compiles the decode step (forced on CPU
    here), the decode plan is static, so batches with other users reuse one graph and
    give the eager tokens."""
    import torch._dynamo
    from transformers import CompileConfig

    rt = make_runtime("llama")
    rt.model.generation_config.eos_token_id = None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18]]
    ids, mask = pad_sequences(prompts, PAD, side="left")
    cc = CompileConfig(fullgraph=True, backend=backend, mode="default" if backend == "inductor" else None)
    cc._compile_all_devices = True  # transformers compiles on GPUs by itself, on CPU when told
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for users in (["a", "b", None, 7], [7, None, "a", "b"], ["b", "b", "b", "b"]):
        want = rt.generate(ids, users, attention_mask=mask, **gen)
        got = rt.generate(ids, users, attention_mask=mask, cache_implementation="static", compile_config=cc, **gen)
        assert got.tolist() == want.tolist(), f"users {users}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    # beams: the decode shape is B x num_beams rows
    beams = dict(gen, num_beams=2, num_return_sequences=2)
    want = rt.generate(ids, ["a", "b", None, 7], attention_mask=mask, **beams)
    got = rt.generate(ids, ["a", "b", None, 7], attention_mask=mask, cache_implementation="static",
                      compile_config=cc, **beams)
    assert got.tolist() == want.tolist()


def test_mixed_sampling_follows_each_users_distribution():
    rt = make_runtime("llama")
    rt.model.generation_config.eos_token_id = None
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    users = [7, "a", "b"]
    ids, mask = pad_sequences(prompts, PAD, side="left")
    torch.manual_seed(0)
    out = rt.generate(ids, users, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.0,
                      pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    S = ids.shape[1]
    for b, (p, u) in enumerate(zip(prompts, users)):
        seq = torch.tensor([p + out.sequences[b, S:].tolist()])
        logits = rt.forward(seq, [u]).logits[0]
        for i, step_logits in enumerate(out.logits):
            # the distribution row b sampled step i from == user u's own, teacher-forced
            torch.testing.assert_close(step_logits[b], logits[len(p) - 1 + i], rtol=1e-4, atol=1e-4)


def test_mixed_beam_search_equals_per_user():
    rt = make_runtime("llama")
    rt.model.generation_config.eos_token_id = None
    prompts = [[5, 6, 7], [8, 9, 10]]
    users = ["a", 7]
    ids = torch.tensor(prompts)
    out = rt.generate(ids, users, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                      pad_token_id=PAD)
    for b, (p, u) in enumerate(zip(prompts, users)):
        one = rt.generate(torch.tensor([p]), [u], max_new_tokens=4, num_beams=3, num_return_sequences=2,
                          do_sample=False, pad_token_id=PAD)
        assert out[2 * b : 2 * b + 2].tolist() == one.tolist()


def test_save_load_round_trip_resumes_training(tmp_path):
    rt = make_runtime("llama")
    for step in range(2):
        ids, mask, users = joint_batch(user_data(step, USERS))
        rt.train_step(ids, users, attention_mask=mask)
    path = rt.save_user(7, tmp_path / "u7")
    assert sorted(p.name for p in path.iterdir()) == [
        "adapters.safetensors", "memory_config.json", "optimizer.safetensors", "user.json"]
    assert MemoryConfig.from_json(path / "memory_config.json") == USERS[7][0]

    other = MilpRuntime(tiny_model("llama"), max_users=2)
    assert other.load_user(path) == 7
    assert other.config(7) == rt.config(7)
    assert other.optimizer.step_count(other.slot(7)) == 2
    ids = torch.randint(3, 90, (2, 6))
    torch.testing.assert_close(other.forward(ids, 7).logits, rt.forward(ids, 7).logits, rtol=0, atol=0)
    # optimizer state came along: one more identical step gives identical adapters
    rt.train_step(ids, 7)
    other.train_step(ids, 7)
    mine, theirs = rt.adapter_state(7), other.adapter_state(7)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-6, atol=1e-7)

    # overwrite in place; evict and load back under another id
    rt.save_user(7, path)
    rt.evict_user("b", tmp_path / "b")
    assert "b" not in rt.users
    assert rt.load_user(tmp_path / "b", "b2") == "b2"
    assert rt.config("b2") == USERS["b"][0]


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    rt = make_runtime("llama")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        rt.save_user("a", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_remove_and_readd_resets_optimizer():
    rt = make_runtime("llama")
    rt.train_step(torch.randint(3, 90, (2, 6)), "a")
    rt.remove_user("a")
    assert "a" not in rt.users
    rt.add_user("z", MemoryConfig.uniform(2, 1, 8), total_steps=3)
    assert rt.optimizer.step_count(rt.slot("z")) == 0
    rt.train_step(torch.randint(3, 90, (2, 6)), ["z", "b"])
    assert rt.optimizer.step_count(rt.slot("z")) == 1


def test_bad_input(tmp_path):
    rt = make_runtime("llama", max_users=3)
    ids = torch.randint(3, 90, (2, 6))
    with pytest.raises(KeyError, match="unknown user 'nobody'"):
        rt.train_step(ids, ["a", "nobody"])
    with pytest.raises(KeyError, match="unknown user"):
        rt.generate(ids, ["a", "nobody"], max_new_tokens=1)
    with pytest.raises(ValueError, match="users has 3 entries but the batch has 2 rows"):
        rt.forward(ids, ["a", "b", 7])
    with pytest.raises(ValueError, match="already loaded"):
        rt.add_user("a", MemoryConfig.uniform(2))
    with pytest.raises(ValueError, match="max_users=3"):
        rt.add_user("d", MemoryConfig.uniform(2))
    rt.remove_user(7)
    with pytest.raises(ValueError, match="has 3 layers but the model has 2"):
        rt.add_user("d", MemoryConfig.uniform(3))
    with pytest.raises(TypeError, match="MemoryConfig"):
        rt.add_user("d", {"layer_mask": [1, 1]})
    with pytest.raises(TypeError, match="hashable id"):
        rt.add_user(None, MemoryConfig.uniform(2))
    with pytest.raises(ValueError, match="lr must be in"):
        AdamWConfig(lr=-1.0)
    with pytest.raises(ValueError, match="total_steps"):
        rt.add_user("d", MemoryConfig.uniform(2), total_steps=0)
    assert "d" not in rt.users
    with pytest.raises(TypeError, match="integer token ids"):
        rt.forward(ids.float(), "a")
    with pytest.raises(ValueError, match="no target tokens"):
        rt.train_step(ids, "a", labels=torch.full_like(ids, -100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rt.load_user(tmp_path / "missing")
    saved = rt.save_user("a", tmp_path / "a")
    gpt2 = MilpRuntime(tiny_model("gpt2"), max_users=1)
    with pytest.raises(ValueError, match="FFN target shapes"):
        gpt2.load_user(saved)
    with pytest.raises(ValueError, match="already holds MiLP adapters"):
        MilpRuntime(rt.model)
    # GPT-2's tokenizer has no pad token: a clear error, not int(None)'s
    with pytest.raises(TypeError, match="pad_token_id must be an int, got None"):
        pad_sequences([[1, 2]], None)
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        pad_sequences([[1, 2]], 0, side="up")


# ------------------------------------------------------------------ optimizer
def test_packed_adamw_equals_torch_adamw_per_user():
    torch.manual_seed(0)
    bank = kernels.AdapterBank(8, 6, max_users=3)
    bank.add(2, [3], init="random")
    bank.add(0, [2, 2], init="random")
    bank.add(1, [5], init="random")
    opt = PackedAdamW([bank], 3)
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.2, max_grad_norm=0.5)
    for u in range(3):
        opt.set_user(u, cfg, total_steps=10)
    a0, b0, _ = bank.adapter_weights(0)
    ra, rb = a0.detach().clone().requires_grad_(), b0.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([ra, rb], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: lr_multiplier(s + 1, 10, 0.2))
    untouched = bank.adapter_weights(2)[0].detach().clone()
    for _ in range(10):
        ga, gb = torch.randn_like(ra), torch.randn_like(rb)
        off = bank.segment(0).offset
        bank.lora_a.grad = torch.zeros_like(bank.lora_a)
        bank.lora_b.grad = torch.zeros_like(bank.lora_b)
        bank.lora_a.grad[off : off + 4] = ga
        bank.lora_b.grad[off : off + 4] = gb
        bank.lora_a.grad[bank.segment(2).offset] = 1.0  # user 2 is not stepped: ignored
        opt.step([0, 1])
        opt.zero_grad()
        ra.grad, rb.grad = ga.clone(), gb.clone()
        torch.nn.utils.clip_grad_norm_([ra, rb], 0.5)
        ref.step()
        sched.step()
    a, b, _ = bank.adapter_weights(0)
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)
    assert torch.equal(bank.adapter_weights(2)[0], untouched)
    assert (opt.step_count(0), opt.step_count(1), opt.step_count(2)) == (10, 10, 0)


def test_packed_adamw_in_float64_is_torch_adamw_and_leaves_other_rows_alone():
    """Float64 banks are updated in float64 (moments too), as torch.optim.AdamW does: the
    stepped users match it to float64 rounding, and a user whose rows lie between theirs (inside
    the stepped span) keeps its weights bit for bit. Before, the span went through float32 and
    back: every row in it was rounded to float32 at each step."""
    g = torch.Generator().manual_seed(0)
    bank = kernels.AdapterBank(8, 6, max_users=3, dtype=torch.float64)
    for u, r in ((0, [3]), (1, [2, 2]), (2, [5])):  # rows in that order: user 1 sits between 0 and 2
        bank.add(u, r, init="random", generator=g)
    opt = PackedAdamW([bank], 3)
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.2, max_grad_norm=0.5)
    for u in range(3):
        opt.set_user(u, cfg, total_steps=10)
    refs = {}
    for u in (0, 2):
        a, b, _ = bank.adapter_weights(u)
        ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ref = torch.optim.AdamW([ra, rb], lr=1e-2, weight_decay=0.1)
        refs[u] = (ra, rb, ref, torch.optim.lr_scheduler.LambdaLR(ref, lambda s: lr_multiplier(s + 1, 10, 0.2)))
    middle = [w.detach().clone() for w in bank.adapter_weights(1)[:2]]
    for _ in range(10):
        bank.lora_a.grad = torch.randn(bank.lora_a.shape, generator=g, dtype=torch.float64)
        bank.lora_b.grad = torch.randn(bank.lora_b.shape, generator=g, dtype=torch.float64)
        for u, (ra, rb, ref, sched) in refs.items():
            seg = bank.segment(u)
            rows = slice(seg.offset, seg.offset + seg.rank)
            ra.grad, rb.grad = bank.lora_a.grad[rows].clone(), bank.lora_b.grad[rows].clone()
            torch.nn.utils.clip_grad_norm_([ra, rb], 0.5)
            ref.step()
            sched.step()
        opt.step([0, 2])
        opt.zero_grad()
    for u, (ra, rb, _, _) in refs.items():
        a, b, _ = bank.adapter_weights(u)
        torch.testing.assert_close(a, ra, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, rb, rtol=1e-12, atol=1e-14)
    for got, want in zip(bank.adapter_weights(1)[:2], middle):
        assert torch.equal(got, want)
    assert opt.user_state(0)["0.exp_avg_a"].dtype == torch.float64
    empty = PackedAdamW([], max_users=1)  # no banks: no compute dtype to pick, clipping still steps
    empty.set_user(0, cfg)
    empty.step([0])
    assert empty.step_count(0) == 1


def test_packed_adamw_follows_rows_when_banks_compact():
    bank = kernels.AdapterBank(4, 4, max_users=4)
    for u in range(3):
        bank.add(u, [4], init="random")
    opt = PackedAdamW([bank], 4)
    for u in range(3):
        opt.set_user(u)
    bank.lora_a.grad = torch.ones_like(bank.lora_a)
    bank.lora_b.grad = torch.ones_like(bank.lora_b)
    opt.step([0, 1, 2])
    state2 = opt.user_state(2)
    bank.remove(0)
    bank.add(3, [12], init="random")  # forces compaction or growth: user 2's rows move
    opt.set_user(3)
    moved = opt.user_state(2)
    for k in state2:
        assert torch.equal(state2[k], moved[k]), k


def test_schedule():
    assert warmup_steps(20, 0.1) == 2 and warmup_steps(None, 0.1) == 0
    assert [lr_multiplier(s, 20) for s in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(20, 20) == pytest.approx(1 / 18)
    assert lr_multiplier(21, 20) == 0.0
    assert lr_multiplier(5, 20, decay="constant") == 1.0
    assert lr_multiplier(1000, None) == 1.0
    opt = PackedAdamW([], max_users=1)
    opt.set_user(0, AdamWConfig(lr=1.0), total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.current_lr(0))
        opt.step([0])
    assert seen == pytest.approx([lr_multiplier(s, 20) for s in range(1, 21)])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_and_autocast_give_the_same_step():
    ids, mask, users = joint_batch(user_data(3, USERS))
    plain = make_runtime("llama")
    want = plain.train_step(ids, users, attention_mask=mask)
    ckpt = make_runtime("llama")
    ckpt.model.train()
    ckpt.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = ckpt.train_step(ids, users, attention_mask=mask)  # recompute in backward sees the users
    assert got == pytest.approx(want, rel=1e-6)
    for u in USERS:
        a, b = plain.adapter_state(u), ckpt.adapter_state(u)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 banks under autocast: no dtype error
        logits = plain.forward(ids, users, attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_packed_adamw_state_follows_users_through_adds_and_removes():
    # with a gradient of ones, a user's exp_avg after k of its steps is 1 - 0.9**k everywhere
    g = torch.Generator().manual_seed(0)
    banks = [kernels.AdapterBank(4, 3, max_users=6, capacity=16) for _ in range(2)]
    opt = PackedAdamW(banks, 6)
    steps: dict[int, int] = {}
    for it in range(40):
        u = int(torch.randint(0, 6, (1,), generator=g))
        if u in steps and it % 3 == 0:
            for b in banks:
                b.remove(u)
            opt.drop_user(u)
            opt.sync()
            del steps[u]
        elif u not in steps:
            for j, b in enumerate(banks):
                b.add(u, [int(torch.randint(1, 9, (1,), generator=g))] * (1 + j), init="random")
            opt.set_user(u)
            steps[u] = 0
        for b in banks:
            b.lora_a.grad = torch.ones_like(b.lora_a)
            b.lora_b.grad = torch.ones_like(b.lora_b)
        active = [v for v in steps if (v + it) % 2 == 0]
        opt.step(active)
        for v in active:
            steps[v] += 1
        for v, k in steps.items():
            st = opt.user_state(v)
            assert int(st["step"]) == k
            for key, t in st.items():
                if key.endswith("exp_avg_a"):
                    torch.testing.assert_close(t, torch.full_like(t, 1 - 0.9**k), msg=f"iteration {it}, user {v}")


def test_mixed_batches_give_each_user_its_own_batches():
    from milp.runtime import mixed_batches

    data = user_data(9, USERS, rows_per_user=5)
    batches = list(mixed_batches(data, PAD, rows_per_user=2, seed=3))
    assert len(batches) == 3
    alone = {u: list(mixed_batches({u: data[u]}, PAD, rows_per_user=2, seed=3)) for u in USERS}
    for i, (ids, mask, users) in enumerate(batches):
        for u in USERS:
            rows = [ids[r][mask[r] == 1].tolist() for r in range(len(users)) if users[r] == u]
            ids_u, mask_u, _ = alone[u][i]
            assert rows == [ids_u[r][mask_u[r] == 1].tolist() for r in range(ids_u.shape[0])]
    with pytest.raises(ValueError, match="rows_per_user"):
        next(mixed_batches(data, PAD, rows_per_user=0))


def test_nvtx_ranges_name_the_runtime_phases(monkeypatch):
    """MILP_NVTX=1: the training step's phases, plan updates, the ops and generate show as named
    ranges (NVTX for nsys; record_function for torch.profiler, as here); none without it."""
    rt = make_runtime("llama")
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(8))
    monkeypatch.setenv("MILP_NVTX", "1")
    with torch.profiler.profile() as prof:
        rt.train_step(ids, ["a", "b"])
        rt.generate(ids, ["a", None], max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    names = {e.name for e in prof.events()}
    want = {"milp.runtime.forward", "milp.runtime.backward", "milp.runtime.optimizer", "milp.runtime.generate",
            "milp.plan.update", "milp.lora_linear", "milp.lora_linear_backward"}
    assert want <= names, want - names
    monkeypatch.setenv("MILP_NVTX", "0")
    with torch.profiler.profile() as prof:
        rt.train_step(ids, ["a", "b"])
    assert not {e.name for e in prof.events() if e.name.startswith("milp.")}


def test_train_step_with_users_without_adapters():
    """A configuration with every layer off is a legal point of the search space (0 trainable
    parameters). Its user gets the base model's loss and no update, alone or mixed with others;
    a batch of only such users used to fail inside autograd ("does not require grad")."""
    model = tiny_model("llama")
    rt = MilpRuntime(model, max_users=2)
    rt.add_user("none", MemoryConfig((False, False), (0, 0), (8, 8)), total_steps=4)
    rt.add_user("a", MemoryConfig.uniform(2, rank=4), init="random", seed=0, total_steps=4)
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        base_loss = model(input_ids=ids, labels=ids).loss  # no users set: the base model
    alone = rt.train_step(ids, ["none", "none"])
    assert set(alone) == {"none"} and alone["none"] == pytest.approx(float(base_loss), rel=1e-5)
    before = rt.adapter_state("a")
    mixed = rt.train_step(ids, ["none", "a"])
    assert set(mixed) == {"none", "a"}
    assert any(not torch.equal(before[k], v) for k, v in rt.adapter_state("a").items())  # "a" was trained


# ------------------------------------------------------------------------------------------------
# the two equivalences above over drawn users: ragged ranks, users without adapters at a layer or at
# all, clipping, any mix of rows


@st.composite
def _drawn_users(draw):
    users = {}
    for u in range(draw(st.integers(1, 4))):
        mask = (draw(st.booleans()), draw(st.booleans()))
        cfg = MemoryConfig(mask, tuple(draw(st.integers(0, 3)) if m else 0 for m in mask),
                           (draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16]))),
                           lora_alpha=draw(st.sampled_from([1.0, 8.0, 16.0])))
        opt = AdamWConfig(lr=draw(st.sampled_from([1e-3, 1e-2])), max_grad_norm=draw(st.sampled_from([None, 0.1])))
        users[f"u{u}"] = (cfg, opt, draw(st.integers(1, 3)))  # the last: rows per batch
    return users


@settings(max_examples=20, deadline=None)
@given(users=_drawn_users(), seed=st.integers(0, 1000))
def test_drawn_users_train_jointly_as_alone_and_generate_mixed_as_alone(users, seed):
    g = torch.Generator().manual_seed(seed)

    def runtime(which):
        rt = MilpRuntime(tiny_model("llama").double(), max_users=8)
        for u in which:
            rt.add_user(u, users[u][0], optim=users[u][1], total_steps=5, init="random", seed=int(u[1:]))
        return rt

    joint, alone = runtime(users), {u: runtime([u]) for u in users}
    for _ in range(2):
        data = {u: [torch.randint(3, 90, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                    for _ in range(rows)] for u, (_, _, rows) in users.items()}
        ids, mask, who = joint_batch(data)
        losses = joint.train_step(ids, who, attention_mask=mask)
        for u, rt in alone.items():
            ids_u, mask_u = pad_sequences(data[u], PAD, side="right")
            assert losses[u] == pytest.approx(rt.train_step(ids_u, [u] * len(data[u]), attention_mask=mask_u)[u],
                                              rel=1e-9, abs=1e-10)
    for u, rt in alone.items():
        mine, ref = joint.adapter_state(u), rt.adapter_state(u)
        assert mine.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-9, atol=1e-11, msg=f"user {u!r}: {k}")
    names = [*users, None]
    prompts = torch.randint(3, 90, (len(names), 5), generator=g)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    mixed = joint.generate(prompts, names, **kw)
    for r, u in enumerate(names):
        one = joint.generate(prompts[r : r + 1], [u], **kw)[0]
        n = one.shape[0]  # a row that ended (EOS) on its own is padded in the mixed batch
        assert torch.equal(mixed[r, :n], one) and bool((mixed[r, n:] == PAD).all()), u


@pytest.mark.parametrize("damage", ["user.json not JSON", "user.json a list", "user.json lacks user",
                                    "user.json bad shapes", "adapters truncated", "optimizer truncated"])
def test_load_user_names_the_damaged_file(tmp_path, damage):
    """A damaged save_user directory is refused with a ValueError naming its file (safetensors
    says only "Error while deserializing header", json a bare JSONDecodeError, a missing key a
    KeyError), and nothing is loaded."""
    from milp.runtime import ADAPTERS_FILE, OPTIMIZER_FILE, USER_FILE

    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    rt.add_user("u", MemoryConfig.uniform(2))
    d = rt.save_user("u", tmp_path / "u")
    info = json.loads((d / USER_FILE).read_text())
    name = {"adapters truncated": ADAPTERS_FILE, "optimizer truncated": OPTIMIZER_FILE}.get(damage, USER_FILE)
    if damage == "user.json not JSON":
        (d / USER_FILE).write_text('{"format": ')
    elif damage == "user.json a list":
        (d / USER_FILE).write_text("[1]")
    elif damage == "user.json lacks user":
        (d / USER_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != "user"}))
    elif damage == "user.json bad shapes":
        (d / USER_FILE).write_text(json.dumps(dict(info, target_shapes=[[32, 64]])))
    else:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 3])
    other = MilpRuntime(tiny_model("llama"), max_users=2)
    with pytest.raises(ValueError, match=re.escape(repr(str(d / name)))):
        other.load_user(d, "v")
    assert other.users == []
