"""Tests for milp.baselines: TpLP / MaLP prompt building, UeLP encoder and prefix inputs."""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch

import milp
from milp.baselines import (
    ELLIPSIS,
    MALP_HEADER,
    MALP_LONG_TITLE,
    MALP_RECENT_TITLE,
    TPLP_HEADER,
    MemoryRetriever,
    UserEncoder,
    count_tokens,
    embedding_norm,
    prefix_inputs,
    tplp_context,
    user_vector,
    user_vectors,
)
from milp.data import IGNORE_INDEX, Record, UserMemory, collate, tokenize_instruction
from milp.metrics import content_tokens

HISTORY = [
    "My knee hurts when I run long distances.",
    "I have had a headache for three days.",
    "I take ibuprofen for the pain.",
    "I drink a lot of coffee every morning.",
    "I sleep only five hours a night.",
]
QUERY = "Should I keep running with this knee?"


def rec(history=HISTORY, profile="a runner who likes coffee", query=QUERY, user_id="u1") -> Record:
    return Record(user_id, profile, list(history), query, "Rest the knee and see a doctor.")


class FakeEmbedder:
    """Deterministic bag-of-words embedder: each content word (``milp.metrics.content_tokens``:
    lower-cased, stop-words removed) maps to a fixed random vector seeded by its CRC32; a text
    is the normalised sum. Counts encode calls."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def word(self, w: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
        return torch.randn(self.dim, generator=g)

    def encode(self, texts):
        self.calls.append(list(texts))
        rows = []
        for t in texts:
            words = content_tokens(t)
            v = sum((self.word(w) for w in words), torch.zeros(self.dim))
            rows.append(torch.nn.functional.normalize(v, dim=0))
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)


@pytest.fixture(params=["plain", "chat"])
def tok(request, tiny_tokenizer, tiny_chat_tokenizer):
    return tiny_tokenizer if request.param == "plain" else tiny_chat_tokenizer


def bullets(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("- ")]


# =========================================================================== TpLP
def test_tplp_layout_most_recent_first(tok):
    ctx = tplp_context(rec(), tok, max_tokens=10_000)
    lines = ctx.splitlines()
    assert lines[0] == TPLP_HEADER
    assert lines[1] == "Profile: a runner who likes coffee"
    assert bullets(ctx) == HISTORY[::-1]


def test_tplp_truncation_exact_budget(tok):
    r = rec()
    full = [tplp_context(r, tok, max_tokens=10_000)]
    # the rendering with the profile and the k most recent turns, for every k
    renders = ["\n".join([TPLP_HEADER, "Profile: a runner who likes coffee"] + [f"- {h}" for h in HISTORY[::-1][:k]])
               for k in range(len(HISTORY) + 1)]
    assert renders[-1] == full[0]
    for k in range(1, len(HISTORY) + 1):
        n = count_tokens(renders[k], tok)
        at = tplp_context(r, tok, max_tokens=n)
        assert at == renders[k]                                     # exactly fits: k turns kept
        below = tplp_context(r, tok, max_tokens=n - 1)
        assert below == renders[k - 1]                              # oldest of them dropped whole
        assert count_tokens(below, tok) <= n - 1


@pytest.mark.parametrize("extra", [12, 17, 25, 31, 64, 120])
def test_tplp_budget_is_respected_and_turns_contiguous(tok, extra):
    budget = count_tokens(TPLP_HEADER, tok) + extra
    ctx = tplp_context(rec(), tok, max_tokens=budget)
    assert count_tokens(ctx, tok) <= budget
    kept = [b for b in bullets(ctx) if not b.endswith(ELLIPSIS)]
    assert kept == HISTORY[::-1][:len(kept)]                       # a most-recent block, none skipped


def test_tplp_single_overlong_turn_is_cut(tok):
    long_turn = " ".join(["my knee hurts when I run"] * 60)
    r = rec(history=["I drink coffee.", long_turn], profile="")
    budget = count_tokens(TPLP_HEADER, tok) + 30
    ctx = tplp_context(r, tok, max_tokens=budget)
    assert count_tokens(ctx, tok) <= budget
    (only,) = bullets(ctx)
    assert only.endswith(ELLIPSIS) and long_turn.startswith(only[: -len(ELLIPSIS)])
    assert len(only) > 20                                           # the budget is used, not wasted


def test_tplp_overlong_profile_is_cut(tok):
    r = rec(profile=" ".join(["runner"] * 200))
    budget = count_tokens(TPLP_HEADER, tok) + 12
    ctx = tplp_context(r, tok, max_tokens=budget)
    assert count_tokens(ctx, tok) <= budget
    assert ctx.splitlines()[1].startswith("Profile: runner") and ctx.endswith(ELLIPSIS)
    assert bullets(ctx) == []


def test_tplp_profile_only_and_empty(tok):
    profile_only = SimpleNamespace(profile="  a runner\n who likes coffee ", history=[])
    assert tplp_context(profile_only, tok) == f"{TPLP_HEADER}\nProfile: a runner who likes coffee"
    assert tplp_context(SimpleNamespace(profile="", history=[]), tok) == ""
    # no profile: the turns alone; a UserMemory works too
    ctx = tplp_context(UserMemory("u", "", ("first turn", "second\nturn")), tok)
    assert ctx == f"{TPLP_HEADER}\n- second turn\n- first turn"


def test_tplp_is_a_system_prompt(tiny_chat_tokenizer):
    r = rec()
    ctx = tplp_context(r, tiny_chat_tokenizer, max_tokens=10_000)
    ex = tokenize_instruction(r, tiny_chat_tokenizer, system_prompt=ctx, add_response=False)
    text = tiny_chat_tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|system|>" + TPLP_HEADER) and HISTORY[-1] in text


def test_tplp_bad_inputs(tok):
    with pytest.raises(ValueError, match="max_tokens"):
        tplp_context(rec(), tok, max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        tplp_context(rec(), tok, max_tokens=True)
    with pytest.raises(ValueError, match="max_tokens=3 is too small"):
        tplp_context(rec(), tok, max_tokens=3)
    with pytest.raises(TypeError, match="record must be a Record"):
        tplp_context("I run", tok)
    with pytest.raises(TypeError, match=r"record.history\[1\] must be a str"):
        tplp_context(SimpleNamespace(profile="", history=["ok", 3]), tok)
    with pytest.raises(TypeError, match="record.history must be a sequence"):
        tplp_context(SimpleNamespace(profile="", history="I run"), tok)
    with pytest.raises(TypeError, match="tokenizer"):
        tplp_context(rec(), object())


# =========================================================================== MaLP
def test_malp_retrieves_most_similar_and_recent(tok):
    emb = FakeEmbedder()
    mem = MemoryRetriever(emb, k_long=1, k_short=2, max_tokens=10_000)
    long_term, short = mem.retrieve(rec())
    assert short == [HISTORY[-1], HISTORY[-2]]                      # most recent first
    assert long_term == [HISTORY[0]]                                # the knee turn, oldest of all
    ctx = mem.context(rec(), tok)
    assert ctx.splitlines() == [MALP_HEADER, MALP_LONG_TITLE, f"- {HISTORY[0]}",
                                MALP_RECENT_TITLE, f"- {HISTORY[-1]}", f"- {HISTORY[-2]}"]


def test_malp_long_term_ranked_by_similarity():
    emb = FakeEmbedder()
    mem = MemoryRetriever(emb, k_long=10, k_short=0)
    long_term, short = mem.retrieve(rec(profile=""))
    q = emb.encode([QUERY])[0]
    sims = [float(q @ emb.encode([t])[0]) for t in long_term]
    assert short == [] and sorted(long_term) == sorted(HISTORY)
    assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("k_long,k_short", [(0, 0), (0, 3), (3, 0), (3, 2), (2, 4), (10, 10)])
def test_malp_no_turn_in_both_parts(k_long, k_short):
    history = HISTORY + [HISTORY[0], "  My knee hurts when I run\nlong distances. "]   # duplicates
    mem = MemoryRetriever(FakeEmbedder(), k_long=k_long, k_short=k_short)
    long_term, short = mem.retrieve(rec(history=history))
    both = long_term + short
    assert len(both) == len(set(both))
    unique_turns = 5 + 1                                            # 5 distinct turns + the profile
    assert len(short) == min(k_short, 5) and len(long_term) == min(k_long, unique_turns - len(short))
    assert short == [HISTORY[0], HISTORY[-1], HISTORY[-2], HISTORY[-3], HISTORY[-4]][:k_short]


def test_malp_profile_in_pool_unless_inside_a_turn():
    mem = MemoryRetriever(FakeEmbedder(), k_long=10, k_short=1)
    long_term, _ = mem.retrieve(rec(profile="knee runner"))
    assert "Profile: knee runner" in long_term
    long_term, _ = mem.retrieve(rec(profile="I take ibuprofen"))  # part of history[2]
    assert not any(t.startswith("Profile:") for t in long_term)


@pytest.mark.parametrize("extra", [8, 12, 22, 40, 70, 130])
def test_malp_budget_and_priority(tok, extra):
    budget = count_tokens(f"{MALP_HEADER}\n{MALP_RECENT_TITLE}", tok) + extra
    mem = MemoryRetriever(FakeEmbedder(), k_long=3, k_short=2, max_tokens=budget)
    ctx = mem.context(rec(), tok)
    assert count_tokens(ctx, tok) <= budget
    long_term, short = mem.retrieve(rec())
    priority = [short[0], long_term[0], short[1], long_term[1], long_term[2]]
    kept = bullets(ctx)
    assert kept  # the most recent turn at least partly survives
    whole = [b for b in kept if not b.endswith(ELLIPSIS)]
    assert sorted(whole) == sorted(priority[:len(whole)])          # dropped from the lowest priority


def test_malp_batch_one_encode_call_cached_and_deterministic(tok):
    emb = FakeEmbedder()
    mem = MemoryRetriever(emb, k_long=2, k_short=1)
    records = [rec(user_id="a"), rec(history=HISTORY[::-1], query="How much coffee is too much?", user_id="b"),
               rec(user_id="c")]
    batch = mem.contexts(records, tok)
    assert len(emb.calls) == 1 and len(emb.calls[0]) == len(set(emb.calls[0]))
    assert batch == [mem.context(r, tok) for r in records]         # all cached: no new call
    assert len(emb.calls) == 1 and mem.cache_size == len(emb.calls[0])
    fresh = MemoryRetriever(FakeEmbedder(), k_long=2, k_short=1)
    assert fresh.contexts(records, tok) == batch
    assert "coffee" in bullets(batch[1])[0]                        # b's retrieval follows b's query
    # the retriever is a cached embedder: UeLP user vectors reuse its cache
    u = user_vectors(records, mem)
    assert len(emb.calls) == 1                                      # every text was cached already
    assert torch.allclose(u, user_vectors(records, FakeEmbedder()), atol=1e-6)
    user_vectors(records + [rec(history=["A brand new turn."], user_id="d")], mem)
    assert emb.calls[1:] == [["A brand new turn."]]                 # only the missing text is embedded
    assert torch.equal(mem.encode([" I drink  a lot of coffee every morning. "]), mem.encode([HISTORY[3]]))
    assert len(emb.calls) == 2
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
        mem.encode([1])
    mem.clear_cache()
    assert mem.cache_size == 0
    assert mem.contexts([], tok) == []


def test_malp_nothing_to_retrieve(tok):
    emb = FakeEmbedder()
    mem = MemoryRetriever(emb, k_long=3, k_short=5)
    ctx = mem.context(rec(profile=""), tok)
    assert emb.calls == []                                          # nothing left to rank: no embedding
    assert ctx.splitlines()[:2] == [MALP_HEADER, MALP_RECENT_TITLE]
    assert MemoryRetriever(emb, k_long=0, k_short=0).context(rec(), tok) == ""


def test_malp_bad_inputs(tok):
    with pytest.raises(TypeError, match="embedder must have an encode"):
        MemoryRetriever(object())
    for kw in ({"k_long": -1}, {"k_short": 1.5}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            MemoryRetriever(FakeEmbedder(), **kw)
    mem = MemoryRetriever(FakeEmbedder())
    with pytest.raises(TypeError, match="use contexts"):
        mem.context([rec()], tok)
    with pytest.raises(TypeError, match="records must be a sequence"):
        mem.contexts(rec(), tok)
    with pytest.raises(TypeError, match=r"records\[1\].query must be a non-empty str"):
        mem.contexts([rec(), SimpleNamespace(profile="", history=["x"])], tok)

    class Broken:
        def encode(self, texts):
            return torch.zeros(1, 4)

    with pytest.raises(ValueError, match="embedder.encode returned"):
        MemoryRetriever(Broken()).context(rec(), tok)


# =========================================================================== UeLP
@pytest.fixture
def lm():
    return milp.tiny_model("llama")


def test_user_vectors_mean_of_unit_embeddings():
    emb = FakeEmbedder()
    records = [rec(), rec(profile="", history=["I drink tea."], user_id="b")]
    u = user_vectors(records, emb)
    assert u.shape == (2, emb.dim) and len(emb.calls) == 1
    texts = ["a runner who likes coffee"] + HISTORY
    assert torch.allclose(u[0], emb.encode(texts).mean(0), atol=1e-6)
    assert torch.allclose(u[1], emb.encode(["I drink tea."])[0], atol=1e-6)
    assert torch.allclose(user_vector(records[0], emb), u[0])
    with pytest.raises(ValueError, match="records must be a non-empty sequence"):
        user_vectors([], emb)
    with pytest.raises(ValueError, match="no profile or history text"):
        user_vectors([SimpleNamespace(profile="", history=[])], emb)
    with pytest.raises(TypeError, match="embedder"):
        user_vector(rec(), None)


def test_user_encoder_shapes_and_initial_scale(lm):
    enc = UserEncoder.from_model(lm, embed_dim=24, num_vectors=3)
    assert (enc.hidden_size, enc.num_vectors) == (32, 3)
    out = enc(torch.randn(5, 24))
    assert out.shape == (5, 3, 32)
    target = embedding_norm(lm)
    assert float(enc.target_norm) == pytest.approx(target)
    assert torch.allclose(out.norm(dim=-1), torch.full((5, 3), target), rtol=1e-5)
    plain = UserEncoder(24, 32, num_vectors=2)
    assert float(plain.target_norm) == 1.0
    assert float(plain.match_embedding_norm(lm).target_norm) == pytest.approx(target)


def test_user_encoder_bad_inputs():
    for args, match in [((0, 8), "embed_dim"), ((8, 0), "hidden_size"), ((8, 8, 0), "num_vectors"),
                        ((8, 8, 2, 1.0), "dropout")]:
        with pytest.raises(ValueError, match=match):
            UserEncoder(*args)
    with pytest.raises(ValueError, match="target_norm"):
        UserEncoder(8, 8, target_norm=0.0)
    enc = UserEncoder(8, 16)
    with pytest.raises(ValueError, match=r"user_vectors must have shape \[B, 8\]"):
        enc(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="user_vectors must have shape"):
        enc(torch.zeros(8))
    with pytest.raises(TypeError, match="floating point"):
        enc(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="user_vectors must be a Tensor"):
        enc([[0.0] * 8])


def test_prefix_inputs_layout_left_and_right_padding(lm):
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [11, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 5, 6], [7, 8, 9, 10], [11, -100, -100, -100]])
    prefix = torch.randn(3, 2, 32)
    out = prefix_inputs(lm, ids, mask, prefix, labels, with_position_ids=True)
    emb = lm.get_input_embeddings()(ids)
    e = out["inputs_embeds"]
    assert e.shape == (3, 6, 32)
    # row 0: [pad pad] [P P] [5 6]
    assert torch.equal(e[0, 2:4], prefix[0]) and torch.equal(e[0, 4:], emb[0, 2:]) and torch.equal(e[0, :2], emb[0, :2])
    assert out["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert out["labels"][0].tolist() == [-100, -100, -100, -100, 5, 6]
    assert out["position_ids"][0].tolist() == [0, 0, 0, 1, 2, 3]
    # row 1 (no padding) and row 2 (right padding): the prefix comes first
    assert torch.equal(e[1, :2], prefix[1]) and torch.equal(e[1, 2:], emb[1])
    assert torch.equal(e[2, :2], prefix[2]) and torch.equal(e[2, 2:], emb[2])
    assert out["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0]
    assert out["labels"][2].tolist() == [IGNORE_INDEX] * 2 + [11, -100, -100, -100]
    # a shared [P, H] prefix and mask=None
    shared = prefix_inputs(lm, ids[1:2], None, prefix[0])
    assert torch.equal(shared["inputs_embeds"][0, :2], prefix[0]) and set(shared) == {"inputs_embeds",
                                                                                    "attention_mask"}


def test_prefix_inputs_gradient_reaches_encoder(lm, tiny_tokenizer):
    emb = FakeEmbedder(dim=16)
    records = [rec(), rec(history=["I drink tea."], user_id="b")]
    lm400 = milp.tiny_model("llama", vocab_size=len(tiny_tokenizer))
    for p in lm400.parameters():
        p.requires_grad_(False)
    enc = UserEncoder.from_model(lm400, embed_dim=16, num_vectors=2)
    batch = collate([tokenize_instruction(r, tiny_tokenizer) for r in records], tiny_tokenizer.pad_token_id)
    out = prefix_inputs(lm400, batch["input_ids"], batch["attention_mask"], enc(user_vectors(records, emb)),
                        batch["labels"])
    loss = lm400(**out).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_prefix_batched_generation_equals_per_row(lm):
    torch.manual_seed(0)
    enc = UserEncoder.from_model(lm, embed_dim=8, num_vectors=3)
    prompts = [[1, 17, 33, 4, 60, 12, 9], [1, 44, 5], [1, 70, 71, 72, 73, 20]]
    prefix = enc(torch.randn(len(prompts), 8)).detach()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = collate([{"input_ids": p} for p in prompts], 0, padding_side="left")
    with torch.no_grad():
        together = lm.generate(**prefix_inputs(lm, batch["input_ids"], batch["attention_mask"], prefix), **kw)
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            alone = lm.generate(**prefix_inputs(lm, ids, torch.ones_like(ids), prefix[i:i + 1]), **kw)
            assert together[i].tolist() == alone[0].tolist(), f"row {i}"
        # and the prefix changes the answer (it conditions the model)
        plain = lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    assert plain[:, -6:].tolist() != together.tolist()


def test_prefix_inputs_bad_inputs(lm):
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    good = torch.zeros(2, 1, 32)
    with pytest.raises(TypeError, match="model must be"):
        prefix_inputs(object(), ids, mask, good)
    with pytest.raises(ValueError, match=r"input_ids must be an integer Tensor \[B, T\]"):
        prefix_inputs(lm, ids[0], mask, good)
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        prefix_inputs(lm, ids.float(), mask, good)
    with pytest.raises(ValueError, match="attention_mask must be"):
        prefix_inputs(lm, ids, mask[:, :2], good)
    with pytest.raises(ValueError, match="labels must be"):
        prefix_inputs(lm, ids, mask, good, labels=ids[:1])
    with pytest.raises(ValueError, match=r"prefix must have shape \[2, P, 32\]"):
        prefix_inputs(lm, ids, mask, torch.zeros(2, 1, 16))
    with pytest.raises(ValueError, match="prefix must have shape"):
        prefix_inputs(lm, ids, mask, torch.zeros(3, 1, 32))
    with pytest.raises(TypeError, match="prefix must be a floating-point"):
        prefix_inputs(lm, ids, mask, torch.zeros(2, 1, 32, dtype=torch.long))


# =========================================================================== real embedder
@pytest.mark.slow
def test_malp_and_user_vectors_with_minilm(tiny_chat_tokenizer):
    from milp.models import find_default_embedder, load_default_embedder

    try:
        find_default_embedder()
    except (ModuleNotFoundError, FileNotFoundError) as exc:  # the optional embedder package
        pytest.skip(str(exc))
    emb = load_default_embedder()
    history = ["I was diagnosed with type 2 diabetes last year.", "I love baking bread on weekends.",
               "My cat is called Tom.", "Work has been busy lately.", "I slept badly yesterday."]
    r = rec(history=history, profile="", query="What should I eat to keep my blood sugar stable?")
    mem = MemoryRetriever(emb, k_long=1, k_short=1)
    long_term, short = mem.retrieve(r)
    assert long_term == [history[0]] and short == [history[-1]]
    assert history[0] in mem.context(r, tiny_chat_tokenizer)
    u = user_vectors([r], emb)
    assert u.shape == (1, 384) and 0 < float(u.norm()) <= 1 + 1e-5


def test_cut_item_keeps_special_token_text_of_the_user(tok):
    """Regression: the cut decoded with ``skip_special_tokens=True``, so a ``<s>`` or ``</s>`` typed in
    the user's own text vanished from a cut item ("knee knee  kn…"), which then was not the item's
    beginning (found by tests/milp/test_baselines_props.py)."""
    profile = "knee knee <s> knee knee </s> run " * 4
    r = SimpleNamespace(profile=profile, history=[])
    budget = count_tokens(f"{TPLP_HEADER}\nProfile: knee knee <s> knee", tok) + 1
    ctx = tplp_context(r, tok, max_tokens=budget)
    line = ctx.splitlines()[1]
    assert count_tokens(ctx, tok) <= budget and line.endswith(ELLIPSIS)
    assert ("Profile: " + profile).startswith(line[: -len(ELLIPSIS)]) and "<s>" in line
