"""Property and edge-case tests of milp.pipeline (the shared instruction adapter and the stages)
and of milp.models' argument checks: drawn adapter settings, queries, batch sizes, truncation
lengths and memories against references written here (a hook-based LoRA, greedy decoding and
cross-entropy by hand, one record at a time); bad arguments refused by name. Models are tiny
and float64, so "equal" means equal (or to float32 rounding where the head runs in float32)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import milp
from milp.data import IGNORE_INDEX, Record, tokenize_instruction
from milp.inject import tiny_model
from milp.models import SentenceEmbedder
from milp.optim import lr_multiplier
from milp.pipeline import (
    PrefixEncoder,
    add_instruction_adapter,
    generate_responses,
    get_instruction_adapter,
    instruction_tune,
    memory_inject,
    memory_total_steps,
    remove_instruction_adapter,
    response_losses,
    score,
)

SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VOCAB = 400  # the tiny tokenizers' vocabulary
_BASES: dict[str, nn.Module] = {}


def base(arch: str) -> nn.Module:
    """A pristine tiny float64 model per architecture (deep-copy it before changing it)."""
    if arch not in _BASES:
        _BASES[arch] = tiny_model(arch, vocab_size=VOCAB).double()
    return _BASES[arch]


def fresh(arch: str) -> nn.Module:
    return copy.deepcopy(base(arch))


WORDS = ["I", "have", "had", "a", "headache", "for", "three", "days", "What", "should", "do", "?", "Drink",
         "water", "rest", "knee", "hurts", "when", "run", "Is", "it", "serious", "ibuprofen", "pain", "fox", "0123"]
texts = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=10).map(" ".join),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip),
)


@st.composite
def records(draw, min_size: int = 1, max_size: int = 4) -> list[Record]:
    n = draw(st.integers(min_size, max_size))
    return [Record(f"u{draw(st.integers(0, 2))}", draw(st.sampled_from(["", "a runner"])),
                   draw(st.lists(texts, min_size=1, max_size=3)), draw(texts), draw(texts)) for _ in range(n)]


def tok_of(chat: bool, tiny_tokenizer, tiny_chat_tokenizer):
    return tiny_chat_tokenizer if chat else tiny_tokenizer


def rec(query: str = "What should I do?", response: str = "Rest and drink water.", user: str = "u0") -> Record:
    return Record(user, "a runner", ["My knee hurts.", "I take ibuprofen."], query, response)


# --------------------------------------------------------------------------- the shared adapter
ARCHS = ["llama", "gpt2", "phi3"]  # separate q/v, GPT-2's Conv1D c_attn, a fused qkv Linear


def manual_logits(model: nn.Module, adapter, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unwrapped ``model`` with ``h = W x + (alpha / r) B A x`` added by hooks
    (``A``, ``B`` are float32: the LoRA term is computed in the wider of the activations' dtype
    and float32, as the adapter does; float64 for these float64 models)."""
    hooks = []
    try:
        for key, a in adapter.lora_A.items():
            b = adapter.lora_B[key]

            def hook(_m, inp, out, a=a.detach(), b=b.detach()):
                dt = torch.promote_types(inp[0].dtype, a.dtype)
                return out + (inp[0].to(dt) @ a.T.to(dt) @ b.T.to(dt)).to(out.dtype) * (adapter.alpha / adapter.rank)

            hooks.append(model.get_submodule(key.replace("__", ".")).register_forward_hook(hook))
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in hooks:
            h.remove()


@SETTINGS
@given(arch=st.sampled_from(ARCHS), rank=st.integers(1, 6), alpha=st.floats(0.25, 64.0), seed=st.integers(0, 2**31 - 1),
       ids_seed=st.integers(0, 2**16))
@example(arch="gpt2", rank=3, alpha=26.0, seed=329485911, ids_seed=171)  # off by 1.6e-6 from a float32 reference
def test_adapter_matches_a_hand_written_lora_and_removes_exactly(arch, rank, alpha, seed, ids_seed):
    """B = 0 changes nothing; with drawn B the model equals a hook-based LoRA on an unwrapped
    copy; ``enabled = False`` is the base; removing restores the very modules, state_dict keys
    and tensors and outputs; the A draw depends on ``seed`` alone; the adapter can be re-added."""
    model = fresh(arch)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(ids_seed))
    with torch.no_grad():
        ref = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    adapter = add_instruction_adapter(model, rank=rank, alpha=alpha, seed=seed)
    assert get_instruction_adapter(model) is adapter and adapter.scale == alpha / rank
    twin = add_instruction_adapter(fresh(arch), rank=rank, alpha=alpha, seed=seed)
    assert all(torch.equal(twin.lora_A[k], v) for k, v in adapter.lora_A.items())
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == {
        k: tuple(v.shape) for k, v in twin.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
        g = torch.Generator().manual_seed(seed)
        for b in adapter.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=g))
        got = model(ids).logits
    torch.testing.assert_close(got, manual_logits(base(arch), adapter, ids), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, ref)
    adapter.enabled = False
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    adapter.enabled = True
    assert remove_instruction_adapter(model) is adapter and get_instruction_adapter(model) is None
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    again = add_instruction_adapter(model, rank=rank, alpha=alpha, seed=seed)  # no leftover wrapper
    assert again.state_dict().keys() == adapter.state_dict().keys()


def test_failed_add_leaves_the_model_untouched():
    """A target that is not a linear layer is refused before anything is wrapped (was: the
    layers matched before it stayed wrapped, with no adapter recorded to remove them)."""
    model = fresh("llama")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError, match="no 2-D weight"):
        add_instruction_adapter(model, targets=("self_attn.q_proj", "rotary_emb"))
    assert [n for n, _ in model.named_modules()] == names
    assert get_instruction_adapter(model) is None
    adapter = add_instruction_adapter(model, rank=2)
    assert len(adapter.lora_A) == 4 and not any(n.endswith(".base.base") for n, _ in model.named_modules())


@pytest.mark.parametrize("targets", ["self_attn.q_proj", [3], [""], ("q_proj", None), 7])
def test_bad_targets_are_refused_by_name(targets):
    model = fresh("llama")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError, match="targets must be a sequence"):
        add_instruction_adapter(model, targets=targets)
    assert [n for n, _ in model.named_modules()] == names and get_instruction_adapter(model) is None


@pytest.mark.parametrize("kw,name", [({"rank": True}, "rank"), ({"rank": 2.0}, "rank"), ({"alpha": 0}, "alpha"),
                                     ({"alpha": float("inf")}, "alpha"), ({"alpha": True}, "alpha")])
def test_bad_adapter_numbers_are_refused_by_name(kw, name):
    with pytest.raises(ValueError, match=name):
        add_instruction_adapter(fresh("llama"), **kw)


# --------------------------------------------------------------------------- instruction tuning
class _Prefix(PrefixEncoder):
    """Soft prompt of two learned vectors, plus a parameter the forward never uses."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.used = nn.Parameter(torch.zeros(2, hidden, dtype=torch.float64))
        self.unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, records):
        return self.used.unsqueeze(0).expand(len(records), -1, -1)


@pytest.mark.parametrize("steps,warmup", [(1, 0.1), (1, 0.0), (2, 0.5), (5, 0.1), (4, 0.0), (3, 1.0)])
def test_instruction_tuning_follows_the_1_based_schedule(tiny_chat_tokenizer, monkeypatch, steps, warmup):
    """Update ``k`` (1-based) uses ``lr * lr_multiplier(k, steps, warmup)``, as the memory
    optimizer does; in particular the first update is not at lr 0 (was: LambdaLR's 0-based
    count made ``steps=1`` train nothing and every window of ``milp.train`` waste a step)."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model = fresh("llama")
    adapter = add_instruction_adapter(model, rank=2)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    instruction_tune(model, tiny_chat_tokenizer, [rec()], steps=steps, lr=1e-2, warmup_ratio=warmup, progress=False)
    assert seen == pytest.approx([1e-2 * lr_multiplier(k, steps, warmup) for k in range(1, steps + 1)], rel=1e-12)
    assert all(x > 0 for x in seen)
    assert any(not torch.equal(before[k], v) for k, v in adapter.state_dict().items())


@pytest.mark.parametrize("kw,exc,name", [
    ({"max_grad_norm": float("nan")}, TypeError, "max_grad_norm"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"), ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ({"lr": float("inf")}, TypeError, "lr"), ({"lr": -1e-3}, ValueError, "lr"), ({"lr": "1e-3"}, TypeError, "lr"),
    ({"warmup_ratio": float("nan")}, TypeError, "warmup_ratio"), ({"warmup_ratio": -0.1}, ValueError, "warmup_ratio"),
    ({"warmup_ratio": 1.5}, ValueError, "warmup_ratio"), ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"steps": 0}, ValueError, "steps"), ({"batch_size": True}, ValueError, "batch_size"),
    ({"max_length": 3}, ValueError, "max_length"),
])
def test_instruction_tuning_bad_settings_are_refused_by_name(tiny_chat_tokenizer, kw, exc, name):
    """A NaN clip norm or an infinite lr used to turn the adapter into NaN silently, and a
    clip norm <= 0 to stop (or reverse) training; now each is refused before any change."""
    model = fresh("llama")
    adapter = add_instruction_adapter(model, rank=2)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with pytest.raises(exc, match=name):
        instruction_tune(model, tiny_chat_tokenizer, [rec()], **{"steps": 2, "progress": False, **kw})
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items()) and not model.training


@SETTINGS
@given(recs=records(1, 4), steps=st.integers(1, 3), batch_size=st.integers(1, 3), seed=st.integers(0, 99),
       training=st.booleans())
def test_instruction_tuning_is_deterministic_by_seed(tiny_chat_tokenizer, recs, steps, batch_size, seed, training):
    """Same seed, same losses and adapter; the model's train/eval mode comes back; the base
    weights never change."""
    runs = []
    for _ in range(2):
        model = fresh("llama").train(training)
        adapter = add_instruction_adapter(model, rank=2, seed=seed)
        losses = instruction_tune(model, tiny_chat_tokenizer, recs, steps=steps, batch_size=batch_size, seed=seed,
                                  lr=1e-2, max_length=48, progress=False)
        assert model.training == training and len(losses) == steps and all(map(math.isfinite, losses))
        remove_instruction_adapter(model)
        assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base("llama").state_dict().values()))
        runs.append((losses, adapter.state_dict()))
    (l1, s1), (l2, s2) = runs
    assert l1 == l2 and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_all_reduce_gets_the_gradients_that_the_step_uses(tiny_chat_tokenizer):
    """``all_reduce`` reduces each parameter's ``.grad`` in place, also for a parameter without
    a local gradient (was: a throw-away zeros tensor, so the other ranks' gradient never reached
    it and the ranks' weights drifted apart)."""
    model = fresh("llama")
    prefix = _Prefix()
    calls = []

    def all_reduce(tensors):  # "the other ranks" contribute a gradient of ones everywhere
        assert len(tensors) == 2 and all(t is p.grad for t, p in zip(tensors, prefix.parameters()))
        calls.append(len(tensors))
        for t in tensors:
            t.fill_(1.0)

    instruction_tune(model, tiny_chat_tokenizer, [rec()], prefix=prefix, steps=1, lr=1e-2, warmup_ratio=0.0,
                     all_reduce=all_reduce, progress=False)
    assert calls == [2]
    assert (prefix.used != 0).all() and (prefix.unused != 0).all()


# --------------------------------------------------------------------------- generation and losses
def greedy(model: nn.Module, tok, record: Record, max_new_tokens: int, max_length: int) -> str:
    """Greedy decoding written out: argmax of the last position, stop at EOS."""
    ids = tokenize_instruction(record, tok, max_length=max_length, add_response=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True).strip()


@SETTINGS
@given(arch=st.sampled_from(["llama", "gpt2"]), chat=st.booleans(), recs=records(1, 5), batch_size=st.integers(1, 5),
       max_new_tokens=st.integers(1, 4), max_length=st.sampled_from([6, 12, 24, 80]))
def test_generation_equals_greedy_decoding_one_record_at_a_time(tiny_tokenizer, tiny_chat_tokenizer, arch, chat,
                                                                recs, batch_size, max_new_tokens, max_length):
    """Any batch size (left padding, longest first) gives each record's own greedy answer from
    its (possibly truncated) prompt (``max_new_tokens`` of them at most), in order."""
    tok = tok_of(chat, tiny_tokenizer, tiny_chat_tokenizer)
    model = base(arch)
    got = generate_responses(model, tok, recs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             max_length=max_length, progress=False)
    assert got == [greedy(model, tok, r, max_new_tokens, max_length) for r in recs]


def hand_ce(model: nn.Module, tok, record: Record, max_length: int) -> float:
    """Mean cross-entropy of the response tokens, position by position, from full logits."""
    ex = tokenize_instruction(record, tok, max_length=max_length)
    ids, labels = ex["input_ids"], ex["labels"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    terms = [-logp[s, labels[s + 1]] for s in range(len(ids) - 1) if labels[s + 1] != IGNORE_INDEX]
    return float(torch.stack(terms).mean()) if terms else 0.0


@SETTINGS
@given(arch=st.sampled_from(["llama", "gpt2"]), chat=st.booleans(), recs=records(1, 4), batch_size=st.integers(1, 4),
       max_length=st.sampled_from([8, 16, 96]))
def test_response_losses_equal_cross_entropy_by_hand(tiny_tokenizer, tiny_chat_tokenizer, arch, chat, recs,
                                                     batch_size, max_length):
    """Each record's loss is the mean CE over its (possibly truncated) response tokens, for any
    batch size (right padding changes nothing); all finite."""
    tok = tok_of(chat, tiny_tokenizer, tiny_chat_tokenizer)
    model = base(arch)
    got = response_losses(model, tok, recs, batch_size=batch_size, max_length=max_length)
    assert len(got) == len(recs) and all(map(math.isfinite, got))
    assert got == pytest.approx([hand_ce(model, tok, r, max_length) for r in recs], rel=1e-5, abs=1e-6)


@SETTINGS
@given(recs=records(2, 5), batch_size=st.integers(1, 5), none_user=st.sampled_from(["u0", "u1", "u2"]))
def test_runtime_rows_follow_their_users(tiny_chat_tokenizer, recs, batch_size, none_user):
    """Through a runtime: fresh users (B = 0) answer as the base model; with trained-looking
    users, mixed batches equal each record alone, and rows whose ``user_key`` is None equal the
    base model's losses."""
    tok = tiny_chat_tokenizer
    rt = milp.MilpRuntime(fresh("llama"), max_users=3)
    for i in range(3):
        rt.add_user(f"u{i}", milp.MemoryConfig.uniform(2, 1 + i % 2, 2), seed=i)
    kw = dict(max_new_tokens=3, max_length=48, progress=False)
    plain = generate_responses(base("llama"), tok, recs, **kw)
    assert generate_responses(rt.model, tok, recs, runtime=rt, batch_size=batch_size, **kw) == plain
    with torch.no_grad():
        for m in rt.state.modules():
            m.bank.lora_b.normal_(std=0.5)
    mixed = generate_responses(rt.model, tok, recs, runtime=rt, batch_size=batch_size, **kw)
    assert mixed == [generate_responses(rt.model, tok, [r], runtime=rt, **kw)[0] for r in recs]
    ce = response_losses(rt.model, tok, recs, runtime=rt, batch_size=batch_size, max_length=48,
                         user_key=lambda r: None if r.user_id == none_user else r.user_id)
    alone = [response_losses(rt.model, tok, [r], runtime=rt, max_length=48)[0] for r in recs]
    plain_ce = response_losses(base("llama"), tok, recs, max_length=48)
    for r, c, a, p in zip(recs, ce, alone, plain_ce):
        assert c == pytest.approx(p if r.user_id == none_user else a, rel=1e-6)


@pytest.mark.parametrize("fn", ["generate", "losses"])
@pytest.mark.parametrize("kw,exc,name", [
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": True}, ValueError, "batch_size"),
    ({"batch_size": "2"}, ValueError, "batch_size"), ({"records": "What?"}, TypeError, "records"),
    ({"records": rec()}, TypeError, "records"), ({"records": [rec(), "x"]}, TypeError, r"records\[1\]"),
    ({"max_length": 2}, ValueError, "max_length"),
])
def test_stage_bad_arguments_are_refused_by_name(tiny_chat_tokenizer, fn, kw, exc, name):
    kw = {"records": [rec()], **kw}
    call = generate_responses if fn == "generate" else response_losses
    extra = {"progress": False} if fn == "generate" else {}
    with pytest.raises(exc, match=name):
        call(base("llama"), tiny_chat_tokenizer, **kw, **extra)


@pytest.mark.parametrize("n", [0, True, -1, 1.0])
def test_max_new_tokens_must_be_a_positive_int(tiny_chat_tokenizer, n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(base("llama"), tiny_chat_tokenizer, [rec()], max_new_tokens=n, progress=False)


def test_instruction_tuning_a_disabled_adapter_is_refused(tiny_chat_tokenizer):
    """It ran every step, returned losses and trained nothing (the forward skips the adapter)."""
    model = base("llama")
    adapter = add_instruction_adapter(model, rank=2)
    adapter.enabled = False
    before = copy.deepcopy(adapter.state_dict())
    with pytest.raises(ValueError, match="adapter is disabled"):
        instruction_tune(model, tiny_chat_tokenizer, [rec()], steps=1, progress=False)
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in before.items())


def test_a_tokenizer_without_eos_leaves_the_models_own_eos_in_force(tiny_chat_tokenizer, monkeypatch):
    """``eos_token_id=None`` passed to ``generate`` overrode the model's generation config, so a
    tokenizer without an EOS made generation run to ``max_new_tokens`` past the model's EOS."""
    model, tok = base("llama"), copy.deepcopy(tiny_chat_tokenizer)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.eos_token = None
    assert tok.eos_token_id is None and tok.pad_token_id is not None
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    generate_responses(model, tok, [rec()], max_new_tokens=2, progress=False)
    assert seen and "eos_token_id" not in seen[0]
    monkeypatch.setattr(model, "generate", real)
    generate_responses(model, tiny_chat_tokenizer, [rec()], max_new_tokens=2, progress=False)


def test_empty_record_lists_and_unknown_users(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    assert generate_responses(base("llama"), tok, [], progress=False) == []
    assert response_losses(base("llama"), tok, []) == []
    rt = milp.MilpRuntime(fresh("llama"), max_users=1)
    with pytest.raises(KeyError, match="unknown user 'u0'"):
        generate_responses(rt.model, tok, [rec()], runtime=rt, progress=False)
    with pytest.raises(KeyError, match="unknown user 'u0'"):
        response_losses(rt.model, tok, [rec()], runtime=rt)


# --------------------------------------------------------------------------- memory injection
@SETTINGS
@given(histories=st.lists(st.lists(texts, min_size=1, max_size=4), min_size=1, max_size=2),
       steps=st.integers(1, 2), rows_per_user=st.integers(1, 3), max_length=st.integers(3, 24), seed=st.integers(0, 9))
def test_memory_injection_takes_memory_total_steps_and_is_deterministic(tiny_tokenizer, histories, steps,
                                                                        rows_per_user, max_length, seed):
    """Each user takes exactly :func:`memory_total_steps` optimizer steps and reports one loss
    per step; a user without adapters is skipped; the same seed gives the same losses and
    adapters."""
    recs = [Record(f"u{i}", "", h, "q?", "r") for i, h in enumerate(histories)]
    kw = dict(steps=steps, rows_per_user=rows_per_user, max_length=max_length)
    runs = []
    for _ in range(2):
        rt = milp.MilpRuntime(tiny_model("llama", vocab_size=VOCAB), max_users=3)
        want = {}
        for r in recs:
            want[r.user_id] = memory_total_steps(r, tiny_tokenizer, **kw)
            rt.add_user(r.user_id, milp.MemoryConfig.uniform(2, 1, 2), total_steps=want[r.user_id], seed=0)
        rt.add_user("off", milp.MemoryConfig((False, False), (0, 0), (2, 2)))
        hist = memory_inject(rt, [*recs, Record("off", "", ["x"], "q", "r")], tiny_tokenizer, seed=seed,
                             progress=False, **kw)
        assert hist.pop("off") == [] and not rt.model.training
        assert {u: len(v) for u, v in hist.items()} == want
        assert {u: rt.optimizer.step_count(rt.slot(u)) for u in want} == want
        runs.append((hist, {u: rt.adapter_state(u) for u in want}))
    (h1, s1), (h2, s2) = runs
    assert h1 == h2
    assert all(torch.equal(s1[u][k], s2[u][k]) for u in s1 for k in s1[u])


@pytest.mark.parametrize("kw,name", [({"steps": 0}, "steps"), ({"steps": -1}, "steps"), ({"steps": True}, "steps"),
                                     ({"steps": 2, "rows_per_user": 0}, "rows_per_user"),
                                     ({"steps": 2, "rows_per_user": 1.5}, "rows_per_user"),
                                     ({"steps": 2, "max_length": 1}, "max_length")])
def test_memory_total_steps_bad_arguments_are_refused_by_name(tiny_tokenizer, kw, name):
    """Was: ``steps=0``/``-1`` gave 0/-1 total steps and ``rows_per_user=0`` a ZeroDivisionError."""
    with pytest.raises(ValueError, match=name):
        memory_total_steps(rec(), tiny_tokenizer, **kw)


def test_memory_inject_bad_arguments(tiny_tokenizer):
    rt = milp.MilpRuntime(fresh("llama"), max_users=1)
    rt.add_user("u0", milp.MemoryConfig.uniform(2, 1, 2))
    for kw, name in [({"rows_per_user": 0}, "rows_per_user"), ({"steps": 1.0}, "steps")]:
        with pytest.raises(ValueError, match=name):
            memory_inject(rt, [rec()], tiny_tokenizer, **{"steps": 1, "progress": False, **kw})
    with pytest.raises(TypeError, match="records"):
        memory_inject(rt, rec(), tiny_tokenizer, steps=1, progress=False)
    assert memory_inject(rt, [], tiny_tokenizer, steps=1, progress=False) == {}
    assert rt.optimizer.step_count(rt.slot("u0")) == 0


# --------------------------------------------------------------------------- score
def test_score_refuses_predictions_that_are_not_a_sequence_of_str():
    """Was: a str of the right length was scored character by character."""
    r = rec(response="R")
    with pytest.raises(TypeError, match="predictions"):
        score([r], "R")
    with pytest.raises(TypeError, match="predictions"):
        score([r], (p for p in ["R"]))
    assert score([r], ("R",))["rouge1"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- milp.models
@pytest.fixture(scope="module")
def encoder(tiny_tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tiny_tokenizer.pad_token_id)
    return BertModel(cfg).double()


@SETTINGS
@given(batch=st.lists(st.one_of(texts, st.sampled_from(["", "   "])), min_size=0, max_size=5),
       batch_size=st.integers(1, 6), max_length=st.integers(2, 16))
def test_sentence_embedder_rows_do_not_depend_on_the_batch(tiny_tokenizer, encoder, batch, batch_size, max_length):
    got = SentenceEmbedder(encoder, tiny_tokenizer, batch_size=batch_size, max_length=max_length).encode(batch)
    alone = SentenceEmbedder(encoder, tiny_tokenizer, batch_size=1, max_length=max_length).encode(batch)
    assert got.shape == (len(batch), 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-6)
    norms = got.norm(dim=1)
    for t, n in zip(batch, norms.tolist()):
        assert n == pytest.approx(0.0 if not t.strip() else 1.0, abs=1e-5)


@pytest.mark.parametrize("kw,name", [({"batch_size": True}, "batch_size"), ({"batch_size": 0}, "batch_size"),
                                     ({"batch_size": 2.0}, "batch_size"), ({"max_length": True}, "max_length"),
                                     ({"max_length": False}, "max_length"), ({"max_length": 1}, "max_length")])
def test_sentence_embedder_bad_sizes_are_refused_by_name(tiny_tokenizer, encoder, kw, name):
    """Was: ``batch_size=True`` was taken as 1."""
    with pytest.raises(ValueError, match=name):
        SentenceEmbedder(encoder, tiny_tokenizer, **kw)


def test_sentence_embedder_default_length_fits_the_encoder(tiny_tokenizer, encoder):
    """The default max_length (256) is capped at a smaller encoder's positions; an explicit
    larger one is refused (a long text would index past them)."""
    limit = encoder.config.max_position_embeddings
    assert limit < 256 and SentenceEmbedder(encoder, tiny_tokenizer).max_length == limit
    long_text = " ".join(["pain"] * 4 * limit)
    assert SentenceEmbedder(encoder, tiny_tokenizer).encode([long_text]).norm().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SentenceEmbedder(encoder, tiny_tokenizer, max_length=limit + 1)


def test_load_model_dtype_names_and_paths_agree(tiny_checkpoint):
    from milp.models import load_model

    a, tok = load_model(tiny_checkpoint, dtype="float64")
    b, _ = load_model(str(tiny_checkpoint), dtype=torch.float64)
    assert a.dtype == b.dtype == torch.float64 and not a.training and tok.pad_token_id is not None
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_model(tiny_checkpoint, dtype="Tensor")
    with pytest.raises(TypeError, match="path_or_none"):
        load_model(b"bytes-path")
