"""Properties of the TpLP / MaLP prompt builders and UeLP's prefix layout over drawn users.

* Budget: every context has at most ``max_tokens`` tokens, is a priority prefix of whole items
  (an item cut with ``…`` only when it is the sole one), and is maximal: the next item in
  priority order would not have fit; a budget too small for the fixed text raises ``ValueError``.
* Retrieval: the long-term memory is the ``k_long`` pool items of highest cosine similarity to
  the query, ties to the more recent (the profile oldest), for any ``k`` (larger than the pool,
  0, an empty history); the short-term memory the ``k_short`` most recent distinct turns; a batch
  gives what each record gives alone.
* UeLP: ``prefix_inputs`` puts the prefix right after each row's left padding, for any padding.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milp.baselines import (
    ELLIPSIS,
    MALP_HEADER,
    MALP_LONG_TITLE,
    MALP_RECENT_TITLE,
    TPLP_HEADER,
    MemoryRetriever,
    count_tokens,
    prefix_inputs,
    tplp_context,
)
from milp.data import IGNORE_INDEX
from milp.inject import tiny_model

FIXTURES = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["knee", "run", "coffee", "headache", "doctor", "pain", "I", "my", "the", "water", "rest", "sleep",
         "ibuprofen", "a", "day", "?", "é", "<s>", "</s>", "<|user|>"]  # the user's text may hold special tokens
texts = st.lists(st.sampled_from(WORDS + [" ", "\n", "  "]), max_size=16).map(" ".join)
histories = st.lists(texts, max_size=7)


def one_line(t: str) -> str:
    return " ".join(t.split())


class TieEmbedder:
    """Each text maps to one of ``n`` fixed directions (by a stable hash), so ties are common."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dirs = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))

    def vec(self, t: str) -> torch.Tensor:
        return self.dirs[sum(map(ord, t)) % self.n]

    def encode(self, items):
        return torch.stack([self.vec(t) for t in items]) if items else torch.zeros(0, 6)


def split_items(ctx: str, header: str) -> list[str]:
    lines = ctx.splitlines()
    assert lines[0] == header
    return lines[1:]


# ============================================================================ TpLP budget
@settings(max_examples=300, **FIXTURES)
@given(profile=texts, history=histories, extra=st.integers(-3, 60))
def test_tplp_context_is_a_maximal_priority_prefix_within_the_budget(tiny_tokenizer, profile, history, extra):
    tok = tiny_tokenizer
    max_tokens = max(1, count_tokens(TPLP_HEADER, tok) + extra)
    rec = SimpleNamespace(profile=profile, history=history)
    prof, turns = one_line(profile), [t for t in map(one_line, history) if t]
    lines = ([f"Profile: {prof}"] if prof else []) + [f"- {t}" for t in reversed(turns)]
    if not lines:
        assert tplp_context(rec, tok, max_tokens=max_tokens) == ""
        return
    try:
        ctx = tplp_context(rec, tok, max_tokens=max_tokens)
    except ValueError as e:
        assert "too small" in str(e)
        lead = lines[0][: lines[0].index(" ") + 1]
        assert count_tokens(f"{TPLP_HEADER}\n{lead}{ELLIPSIS}", tok) > max_tokens
        return
    assert count_tokens(ctx, tok) <= max_tokens
    got = split_items(ctx, TPLP_HEADER)
    if got[-1].endswith(ELLIPSIS) and got[-1] not in lines[:1]:  # a cut item: the only one
        assert len(got) == 1 and count_tokens("\n".join([TPLP_HEADER, lines[0]]), tok) > max_tokens
        assert lines[0].startswith(got[0][: -len(ELLIPSIS)])  # its beginning kept
        return
    assert got == lines[: len(got)]
    if len(got) < len(lines):  # maximal: the next item would not have fit
        assert count_tokens("\n".join([TPLP_HEADER] + lines[: len(got) + 1]), tok) > max_tokens


# ============================================================================ MaLP retrieval
@settings(max_examples=300, deadline=None)
@given(profile=texts, history=histories, query=texts.filter(str.strip), k_long=st.integers(0, 9),
       k_short=st.integers(0, 9), n_dirs=st.sampled_from([1, 2, 3, 50]))
def test_retrieval_is_the_top_k_by_cosine_similarity_ties_to_the_most_recent(profile, history, query, k_long,
                                                                           k_short, n_dirs):
    emb = TieEmbedder(n_dirs)
    mem = MemoryRetriever(emb, k_long=k_long, k_short=k_short)
    long_term, short = mem.retrieve(SimpleNamespace(profile=profile, history=history, query=query))
    unique = list(dict.fromkeys(t for t in map(one_line, reversed(history)) if t))  # most recent first
    assert short == unique[:k_short]
    pool = [(t, t) for t in unique[k_short:]]
    prof = one_line(profile)
    if prof and not any(prof in t for t in unique):
        pool.append(("Profile: " + prof, prof))
    q = emb.vec(one_line(query))
    sims = [float(F.cosine_similarity(q, emb.vec(e), dim=0, eps=1e-8)) for _, e in pool]
    ranked = sorted(range(len(pool)), key=lambda j: (-sims[j], j))
    assert long_term == [pool[j][0] for j in ranked[:k_long]]
    assert len(long_term) == min(k_long, len(pool))
    assert not set(long_term) & set(short)


@settings(max_examples=150, **FIXTURES)
@given(users=st.lists(st.tuples(texts, histories, texts.filter(str.strip)), min_size=1, max_size=4),
       k_long=st.integers(0, 4), k_short=st.integers(0, 4), extra=st.integers(-3, 80))
def test_malp_batch_equals_each_record_alone_and_keeps_the_budget(tiny_chat_tokenizer, users, k_long, k_short,
                                                                  extra):
    tok = tiny_chat_tokenizer
    max_tokens = max(1, count_tokens(MALP_HEADER, tok) + extra)
    records = [SimpleNamespace(profile=p, history=h, query=q) for p, h, q in users]
    mem = MemoryRetriever(TieEmbedder(3), k_long=k_long, k_short=k_short, max_tokens=max_tokens)
    try:
        batch = mem.contexts(records, tok)
    except ValueError as e:
        assert "too small" in str(e)
        return
    alone = [MemoryRetriever(TieEmbedder(3), k_long=k_long, k_short=k_short, max_tokens=max_tokens).context(r, tok)
             for r in records]
    assert batch == alone
    for r, ctx in zip(records, batch):
        assert count_tokens(ctx, tok) <= max_tokens
        long_term, short = mem.retrieve(r)
        if not ctx:
            assert not long_term and not short
            continue
        lines = split_items(ctx, MALP_HEADER)
        titles = [t for t in lines if t in (MALP_LONG_TITLE, MALP_RECENT_TITLE)]
        assert titles in ([MALP_LONG_TITLE, MALP_RECENT_TITLE], [MALP_LONG_TITLE], [MALP_RECENT_TITLE])
        # recent 1, long-term 1, recent 2, long-term 2, …: the kept whole items are a prefix of that
        prio = [x for pair in zip(short + [None] * len(long_term), long_term + [None] * len(short))
                for x in pair if x is not None]
        items = [x[2:] for x in lines if x.startswith("- ")]
        whole = [x for x in items if not x.endswith(ELLIPSIS) or x in prio]
        assert sorted(whole) == sorted(prio[: len(whole)])


# ============================================================================ UeLP prefix
_LM = tiny_model("llama")


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=4),
       n_prefix=st.integers(1, 3), left=st.booleans(), data=st.data())
def test_prefix_sits_right_after_each_rows_left_padding(rows, n_prefix, left, data):
    width = max(p + n for p, n in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    spans = []
    for b, (pad, n) in enumerate(rows):
        start = pad if left else 0
        toks = torch.tensor(data.draw(st.lists(st.integers(3, 95), min_size=n, max_size=n)))
        ids[b, start:start + n], mask[b, start:start + n], labels[b, start:start + n] = toks, 1, toks
        spans.append((start, n))
    prefix = torch.randn(len(rows), n_prefix, 32)
    out = prefix_inputs(_LM, ids, mask, prefix, labels, with_position_ids=True)
    emb = _LM.get_input_embeddings()(ids).detach()
    e = out["inputs_embeds"].detach()
    for b, (start, n) in enumerate(spans):
        P = n_prefix
        assert torch.equal(e[b, start:start + P], prefix[b])
        assert torch.equal(e[b, start + P:start + P + n], emb[b, start:start + n])
        assert out["attention_mask"][b].tolist() == [0] * start + [1] * (P + n) + [0] * (width - start - n)
        assert out["labels"][b].tolist() == ([IGNORE_INDEX] * (start + P) + labels[b, start:start + n].tolist()
                                             + [IGNORE_INDEX] * (width - start - n))
        assert out["position_ids"][b, start:start + P + n].tolist() == list(range(P + n))
