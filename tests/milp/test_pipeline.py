"""Tests of milp.pipeline: the shared instruction adapter and the stages on tiny models."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import milp
from milp.data import Record
from milp.pipeline import (
    INSTRUCTION_TARGETS,
    add_instruction_adapter,
    generate_responses,
    get_instruction_adapter,
    instruction_tune,
    memory_inject,
    memory_total_steps,
    remove_instruction_adapter,
    response_losses,
    score,
    user_content,
)


def _records(n: int = 3) -> list[Record]:
    return [
        Record(f"u{i}", "a runner" if i % 2 else "", [f"My knee hurts {'a bit' if i else 'badly'}.",
                                                       "I take ibuprofen."],
               "What should I do?", "Rest and drink water.")
        for i in range(n)
    ]


def _model(seed: int = 0):
    """A tiny random-init LLaMA with the 400-token vocabulary of the tiny tokenizers."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


@pytest.mark.parametrize("arch", list(milp.SUPPORTED_ARCHITECTURES))
def test_instruction_adapter_starts_as_identity_and_removes_cleanly(arch):
    assert sorted(INSTRUCTION_TARGETS) == sorted(milp.SUPPORTED_ARCHITECTURES)
    model = milp.tiny_model(arch)
    ids = torch.randint(3, 90, (2, 7))
    ref = model(ids).logits
    adapter = add_instruction_adapter(model, rank=4, seed=1)
    assert get_instruction_adapter(model) is adapter
    assert torch.equal(model(ids).logits, ref)  # B = 0
    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.normal_()
    changed = model(ids).logits
    assert not torch.allclose(changed, ref)
    adapter.enabled = False
    assert torch.equal(model(ids).logits, ref)
    adapter.enabled = True
    remove_instruction_adapter(model)
    assert get_instruction_adapter(model) is None
    assert torch.equal(model(ids).logits, ref)


def test_instruction_adapter_bad_input():
    model = milp.tiny_model("llama")
    with pytest.raises(ValueError, match="rank"):
        add_instruction_adapter(model, rank=0)
    with pytest.raises(ValueError, match="alpha"):
        add_instruction_adapter(model, alpha=float("nan"))
    with pytest.raises(ValueError, match="no module named"):
        add_instruction_adapter(model, targets=["nope"])
    add_instruction_adapter(model)
    with pytest.raises(ValueError, match="already has"):
        add_instruction_adapter(model)
    with pytest.raises(ValueError, match="no instruction adapter"):
        remove_instruction_adapter(milp.tiny_model("llama"))


def test_memory_injection_learns_each_users_history(tiny_tokenizer):
    model = _model()
    rt = milp.MilpRuntime(model, max_users=4, optim=milp.AdamWConfig(lr=1e-2))
    recs = _records(3)
    for r in recs:
        rt.add_user(r.user_id, milp.MemoryConfig.uniform(2, 2, 4), seed=0,
                    total_steps=memory_total_steps(r, tiny_tokenizer, steps=15))
    hist = memory_inject(rt, recs, tiny_tokenizer, steps=15, progress=False)
    assert set(hist) == {"u0", "u1", "u2"}
    for u, losses in hist.items():
        assert len(losses) == 15
        assert losses[-1] < losses[0] - 0.5, (u, losses)
    # the base model is untouched: without users the logits are those of a fresh copy
    ids = torch.randint(3, 300, (1, 6))
    assert torch.equal(model(ids).logits, _model()(ids).logits)


def test_memory_injection_skips_users_without_adapters(tiny_tokenizer):
    rt = milp.MilpRuntime(_model(), max_users=2)
    rt.add_user("u0", milp.MemoryConfig((False, False), (0, 0), (8, 8)))
    rt.add_user("u1", milp.MemoryConfig.uniform(2, 1, 4), total_steps=2)
    hist = memory_inject(rt, _records(2), tiny_tokenizer, steps=2, progress=False)
    assert hist["u0"] == [] and len(hist["u1"]) == 2


def test_memory_injection_unknown_user(tiny_tokenizer):
    rt = milp.MilpRuntime(_model(), max_users=2)
    with pytest.raises(KeyError, match="unknown user"):
        memory_inject(rt, _records(1), tiny_tokenizer, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        memory_inject(rt, _records(1), tiny_tokenizer, steps=0, progress=False)


def test_instruction_tuning_trains_only_the_shared_weights(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = _model()
    rt = milp.MilpRuntime(model, max_users=4)
    recs = _records(3)
    for r in recs:
        rt.add_user(r.user_id, milp.MemoryConfig.uniform(2, 1, 4), init="random", seed=0)
    banks = [m.bank.lora_a.detach().clone() for m in rt.state.modules()]
    adapter = add_instruction_adapter(model, rank=4)
    before = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    losses = instruction_tune(model, tok, recs, runtime=rt, steps=12, batch_size=2, lr=1e-2, progress=False)
    assert len(losses) == 12 and losses[-1] < losses[0]
    after = adapter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, m.bank.lora_a) for a, m in zip(banks, rt.state.modules()))  # memory frozen
    assert all(m.bank.lora_a.grad is None for m in rt.state.modules())  # no gradient gathered either


def test_instruction_tuning_leaves_no_gradient_on_an_unfrozen_base(tiny_chat_tokenizer):
    model = _model()
    assert all(p.requires_grad for p in model.parameters())  # a plain HF model: nothing frozen
    adapter = add_instruction_adapter(model, rank=4)
    base = [p for n, p in model.named_parameters() if not any(p is q for q in adapter.parameters())]
    before = [p.detach().clone() for p in base]
    tuned = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    instruction_tune(model, tiny_chat_tokenizer, _records(2), steps=3, batch_size=2, progress=False)
    assert all(p.grad is None for p in base)
    assert all(torch.equal(a, p) for a, p in zip(before, base))
    assert any(not torch.equal(v, adapter.state_dict()[k]) for k, v in tuned.items())
    assert all(p.grad is None for p in adapter.parameters())  # freed at the end, as before


def test_instruction_tuning_needs_something_to_train(tiny_tokenizer):
    with pytest.raises(ValueError, match="nothing to train"):
        instruction_tune(_model(), tiny_tokenizer, _records(1), steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        instruction_tune(_model(), tiny_tokenizer, [], steps=1, progress=False)


def _three_users(max_users: int) -> tuple[torch.nn.Module, milp.MilpRuntime, list[Record]]:
    """A tiny model with a runtime of 3 users (ranks 1, 2, 3; random A and B) and their records."""
    model = _model()
    rt = milp.MilpRuntime(model, max_users=max_users)
    recs = _records(3)
    for i, r in enumerate(recs):
        rt.add_user(r.user_id, milp.MemoryConfig.uniform(2, i + 1, 4), init="random", seed=i)
    with torch.no_grad():
        for m in rt.state.modules():
            m.bank.lora_b.normal_(std=0.5)
    return model, rt, recs


def test_mixed_user_generation_and_losses_equal_per_user(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    recs[1] = Record("u1", "", ["x"], "A much longer question that needs more padding?", "ok")
    mixed = generate_responses(model, tok, recs, runtime=rt, max_new_tokens=5, batch_size=3, progress=False)
    alone = [generate_responses(model, tok, [r], runtime=rt, max_new_tokens=5, progress=False)[0] for r in recs]
    assert mixed == alone
    ce_mixed = response_losses(model, tok, recs, runtime=rt, batch_size=3)
    ce_alone = [response_losses(model, tok, [r], runtime=rt)[0] for r in recs]
    assert ce_mixed == pytest.approx(ce_alone, rel=1e-5)
    base = response_losses(model, tok, recs)
    assert base != pytest.approx(ce_mixed, rel=1e-3)  # the adapters matter


def _stored_users(folder) -> tuple[milp.MilpRuntime, milp.MilpRuntime, list[Record]]:
    """5 users (random A and B) in a runtime holding them all, saved in a store in ``folder``, and
    a runtime of 2 slots on that store (each on its own copy of the tiny model), and their records."""
    recs = _records(5)
    full = milp.MilpRuntime(_model(), max_users=5)
    for i, r in enumerate(recs):
        full.add_user(r.user_id, milp.MemoryConfig.uniform(2, 1 + i % 2, 4), init="random", seed=i)
    with torch.no_grad():
        for m in full.state.modules():
            m.bank.lora_b.normal_(std=0.5)
    for r in recs:
        full.save_user(r.user_id, folder / milp.user_dirname(r.user_id))
    return full, milp.MilpRuntime(_model(), max_users=2, store=milp.UserStore(folder)), recs


def test_generation_and_losses_with_users_from_a_store(tiny_chat_tokenizer, tmp_path):
    """A runtime with 2 slots answers 5 users saved in a store (loaded and evicted as batches
    need them) exactly as a runtime holding all of them."""
    tok = tiny_chat_tokenizer
    full, rt, recs = _stored_users(tmp_path)
    kw = dict(max_new_tokens=5, batch_size=2, progress=False)
    assert generate_responses(rt.model, tok, recs, runtime=rt, **kw) == generate_responses(
        full.model, tok, recs, runtime=full, **kw)
    assert response_losses(rt.model, tok, recs, runtime=rt, batch_size=2) == pytest.approx(
        response_losses(full.model, tok, recs, runtime=full, batch_size=2), rel=1e-5)
    assert rt.cache_info().loads >= 5 and len(rt.users) == 2
    with pytest.raises(KeyError, match="unknown user 'nobody': not loaded, nor saved in UserStore"):
        generate_responses(rt.model, tok, [Record("nobody", "", ["h"], "q", "r")], runtime=rt, **kw)


def test_context_fn_reaches_the_prompt(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = _model()
    recs = _records(2)
    plain = response_losses(model, tok, recs)
    ctx = response_losses(model, tok, recs, context_fn=lambda r: "Profile: " + " ".join(r.history))
    assert plain != pytest.approx(ctx)


def test_score_and_user_content():
    r = Record("u", "I run marathons", ["My knee hurts"], "What now?", "Rest your knee.")
    assert user_content(r) == ["I run marathons", "My knee hurts"]
    s = score([r], ["Rest the knee."])
    # {rest, the, knee} vs {rest, your, knee}: P = R = 2/3
    assert s["rouge1"] == pytest.approx(200 / 3) and s["rougeL"] == pytest.approx(200 / 3)
    # content words {rest, knee} vs {run, marathons, knee, hurts}: P = 1/2, R = 1/4
    assert s["persona_f1"] == pytest.approx(100 * 2 * 0.5 * 0.25 / 0.75)
    assert score([r], [""]) == {"rouge1": 0.0, "rougeL": 0.0, "persona_f1": 0.0}
    with pytest.raises(ValueError, match="predictions"):
        score([r], [])


def test_streamed_answers_grow_to_the_answers_in_mixed_batches(tiny_chat_tokenizer):
    """``stream(i, text)`` gets each record's answer so far: every text extends the one before,
    the last is the returned answer, and the answers are those generated without a stream."""
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=3)
    kw = dict(runtime=rt, max_new_tokens=12, batch_size=2, progress=False)
    seen: dict[int, list[str]] = {}
    got = generate_responses(model, tok, recs, stream=lambda i, text: seen.setdefault(i, []).append(text), **kw)
    assert got == generate_responses(model, tok, recs, **kw)
    for i, answer in enumerate(got):
        texts = seen.get(i, [])
        assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
        assert (texts[-1] if texts else "") == answer
    assert max(len(t) for t in seen.values()) > 1  # pieces came one step at a time, not only at the end
    with pytest.raises(TypeError, match="stream must be a callable"):
        generate_responses(model, tok, recs, stream="yes", **kw)


class _NoEos:
    """A tokenizer without an end-of-text token (``generate`` then fills an ended row with tokens)."""

    eos_token_id = None

    def __init__(self, tok) -> None:
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "no-eos"])
def test_stop_ends_one_answer_where_it_says_and_spares_the_others(tiny_chat_tokenizer, eos):
    """``stop(i)`` saying ``True`` after the 4th token: record 0's answer is the one of 4 new
    tokens (in the same batch), and so is the last text streamed for it; the others' are
    untouched; once every row said ``True`` the batch generates no further (1 model call for 1
    token, not 12). Without an end-of-text token too, where ``generate`` goes on filling an ended
    row with tokens."""
    tok = tiny_chat_tokenizer if eos else _NoEos(tiny_chat_tokenizer)
    model, rt, recs = _three_users(max_users=3)
    if not eos:
        model.generation_config.eos_token_id = None
    kw = dict(runtime=rt, batch_size=3, progress=False)
    full = generate_responses(model, tok, recs, max_new_tokens=12, **kw)
    four = generate_responses(model, tok, recs, max_new_tokens=4, **kw)
    assert full[0] != four[0]  # the stop makes a difference
    asked: dict[int, int] = {}

    def stop_0_at_4(i: int) -> bool:
        asked[i] = asked.get(i, 0) + 1
        return i == 0 and asked[i] == 4

    streamed: dict[int, list[str]] = {}
    got = generate_responses(model, tok, recs, max_new_tokens=12, stop=stop_0_at_4,
                             stream=lambda i, text: streamed.setdefault(i, []).append(text), **kw)
    assert got == [four[0], full[1], full[2]]
    assert asked[0] == 4  # not asked again once it said True
    for i, answer in enumerate(got):  # the stream stops where the answer does
        assert streamed[i][-1] == answer and all(answer.startswith(t) for t in streamed[i]), (i, streamed[i])
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = generate_responses(model, tok, recs, max_new_tokens=12, stop=lambda i: True, **kw)
    finally:
        handle.remove()
    one = generate_responses(model, tok, recs, max_new_tokens=1, **kw)
    assert got == one and len(calls) == 1  # every row ended after its first token: one model call
    with pytest.raises(TypeError, match="stop must be a callable"):
        generate_responses(model, tok, recs, stop=True, **kw)


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "no-eos"])
def test_records_of_different_lengths_share_a_batch(tiny_chat_tokenizer, eos):
    """``max_new_tokens`` one per record: each answer (and the last text streamed for it) is the
    one its own length gives, in one batch that generates for the longest."""
    tok = tiny_chat_tokenizer if eos else _NoEos(tiny_chat_tokenizer)
    model, rt, recs = _three_users(max_users=3)
    if not eos:
        model.generation_config.eos_token_id = None
    kw = dict(runtime=rt, batch_size=3, progress=False)
    by_length = {n: generate_responses(model, tok, recs, max_new_tokens=n, **kw) for n in (3, 7, 12)}
    assert len({by_length[n][0] for n in (3, 7, 12)}) == 3  # the lengths make a difference
    streamed: dict[int, str] = {}
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = generate_responses(model, tok, recs, max_new_tokens=(7, 12, 3),
                                 stream=lambda i, text: streamed.__setitem__(i, text), **kw)
    finally:
        handle.remove()
    assert got == [by_length[7][0], by_length[12][1], by_length[3][2]] == [streamed[i] for i in range(3)]
    assert len(calls) == 12  # one generation of 12 tokens
    for bad, match in (([3, 4], "one length per record: got 2 for 3 records"), ([3, 0, 4], r"max_new_tokens\[1\]"),
                       ("12", "an int >= 1 or a sequence"), (True, "an int >= 1 or a sequence"),
                       ([3, True, 4], r"max_new_tokens\[1\] must be an int")):
        with pytest.raises(ValueError, match=match):
            generate_responses(model, tok, recs, max_new_tokens=bad, **kw)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 399), max_size=24), chunk=st.integers(1, 3))
def test_answer_stream_hands_texts_that_the_answer_extends(tiny_chat_tokenizer, ids, chunk):
    """Any token sequence (special tokens, partial UTF-8 bytes, whitespace among them), put a
    step of ``chunk`` tokens at a time: each handed text extends the one before and the final
    answer (decoded as generate_responses does) extends them all."""
    from milp.pipeline import _AnswerStream

    tok = tiny_chat_tokenizer
    texts: list[str] = []
    s = _AnswerStream(tok, [7], lambda i, t: texts.append(t) if i == 7 else None)
    s.put(torch.tensor([[1, 2, 3]]))  # the prompt
    for k in range(0, len(ids), chunk):
        s.put(torch.tensor(ids[k : k + chunk]))
    s.end()
    final = tok.decode(ids, skip_special_tokens=True).strip()
    s.finish([final])
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert (texts[-1] if texts else "") == final
