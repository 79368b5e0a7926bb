"""milp.metrics on hand-computed cases, including empty strings."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from milp.metrics import (
    STOP_WORDS,
    EmbeddingJudge,
    Judge,
    LMJudge,
    WinRate,
    content_tokens,
    paired_difference,
    persona_f1,
    persona_f1_single,
    rouge_per_example,
    rouge_scores,
    win_rate,
)

approx = pytest.approx


# --------------------------------------------------------------------------- ROUGE
@pytest.mark.parametrize("pred, ref, r1, rl", [
    ("the cat sat", "the cat sat", 100.0, 100.0),
    # stemming: cats -> cat; 3 of 3 predicted, 3 of 6 reference: F = 2/3
    ("the cats sat", "the cat sat on the mat", 200 / 3, 200 / 3),
    # same unigrams, LCS of length 1: P = R = 1/3
    ("cat dog bird", "bird dog cat", 100.0, 100 / 3),
    ("running", "run", 100.0, 100.0),
    ("", "a reference", 0.0, 0.0),
    ("a prediction", "", 0.0, 0.0),
    ("", "", 0.0, 0.0),
    ("!!!", "!!!", 0.0, 0.0),  # no [a-z0-9] token on either side
])
def test_rouge_hand_cases(pred, ref, r1, rl):
    out = rouge_scores([pred], [ref])
    assert out == {"rouge1": approx(r1), "rougeL": approx(rl)}


def test_rouge_averages_over_examples_and_checks_input():
    assert rouge_scores(["the cat sat", ""], ["the cat sat", "x"]) == {"rouge1": 50.0, "rougeL": 50.0}
    with pytest.raises(ValueError, match="same length"):
        rouge_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="nothing to score"):
        rouge_scores([], [])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a string"):
        rouge_scores([None], ["a"])
    with pytest.raises(TypeError, match="predictions must be a sequence of strings"):
        rouge_scores("abc", ["a"])


# --------------------------------------------------------------------------- Persona-F1
def test_content_tokens_rule():
    assert content_tokens("I don't like the Flu-shot!") == ["like", "flu", "shot"]
    assert content_tokens("Café’s  menu_item, 42kg") == ["cafés", "menu", "item", "42kg"]
    assert content_tokens(["My KNEE", "hurts."]) == ["knee", "hurts"]
    assert content_tokens("I'm sure you're fine; it's ok") == ["sure", "fine", "ok"]  # im/youre/its are stop words
    assert content_tokens("") == [] and content_tokens([]) == []
    assert {"the", "dont", "im"} <= STOP_WORDS and "pain" not in STOP_WORDS


@pytest.mark.parametrize("pred, content, expected", [
    ("I love hiking", ["Hiking is my passion"], 50.0),                    # {love,hiking} vs {hiking,passion}
    ("knee pain when running", ["I run daily", "my knee hurts"], 200 / 7),  # P=1/3, R=1/4, no stemming
    ("pain pain pain", "pain", 50.0),                                     # multiset: overlap 1, P=1/3, R=1
    ("Knee, knee!", ["knee knee"], 100.0),
    ("completely unrelated words", ["my knee hurts"], 0.0),               # no overlap
    ("", ["my knee hurts"], 0.0),                                         # empty response
    ("the and of", ["my knee hurts"], 0.0),                               # response only stop words
    ("knee pain", [], 0.0),                                               # no user content
    ("knee pain", ["", "  "], 0.0),
    ("knee pain", "the and I", 0.0),                                      # content only stop words
    ("", "", 0.0),                                                        # both empty
])
def test_persona_f1_hand_cases(pred, content, expected):
    assert persona_f1_single(pred, content) == approx(expected)


def test_persona_f1_mean_and_errors():
    assert persona_f1(["knee pain", ""], [["my knee hurts"], ["my knee hurts"]]) == approx(25.0)
    # history + profile given as one list of strings per user
    assert persona_f1(["runner with knee pain"], [["runner", "my knee hurts"]]) == approx(200 / 3)
    with pytest.raises(ValueError, match="same length"):
        persona_f1(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="nothing to score"):
        persona_f1([], [])
    with pytest.raises(TypeError, match="user_contents must be a sequence"):
        persona_f1(["a"], None)
    with pytest.raises(TypeError, match="prediction must be a string"):
        persona_f1_single(3, "a")


# --------------------------------------------------------------------------- win rate
class LongerWins:
    name = "longer-wins"

    def judge(self, query, context, answer_a, answer_b, reference=None):
        if len(answer_a) == len(answer_b):
            return "tie"
        return "A" if len(answer_a) > len(answer_b) else "B"


class AlwaysA:
    name = "always-a"

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return "A"


def test_win_rate_counts_ties_half_and_names_the_judge():
    assert isinstance(LongerWins(), Judge)
    out = win_rate(["long answer", "long answer", "x", "same"], ["short", "s", "longer", "same"],
                   ["q"] * 4, [""] * 4, judge=LongerWins())
    assert out == WinRate(win_rate=62.5, wins=2, losses=1, ties=1, n=4, judge="longer-wins")
    assert out.to_dict()["judge"] == "longer-wins"
    # swap=True: an order-biased judge contradicts itself on every pair -> all ties
    biased = win_rate(["a", "b"], ["c", "d"], ["q", "q"], ["", ""], judge=AlwaysA(), swap=True)
    assert (biased.win_rate, biased.ties) == (50.0, 2)
    assert win_rate(["a"], ["b"], ["q"], [""], judge=AlwaysA()).win_rate == 100.0


def test_win_rate_uses_judge_batch_and_validates():
    class Batch:
        name = "batch"
        calls = 0

        def judge(self, *a, **k):
            raise AssertionError("judge_batch should be used")

        def judge_batch(self, queries, contexts, a, b, refs):
            Batch.calls += 1
            assert refs == ["r1", "r2"]
            return ["B", "tie"]

    out = win_rate(["a", "b"], ["c", "d"], ["q1", "q2"], [["h"], ["h"]], ["r1", "r2"], judge=Batch())
    assert (out.win_rate, out.losses, Batch.calls) == (25.0, 1, 1)

    class Bad:
        name = "bad"

        def judge(self, *a, **k):
            return "maybe"

    with pytest.raises(ValueError, match="judge 'bad' returned 'maybe' for example 0"):
        win_rate(["a"], ["b"], ["q"], [""], judge=Bad())
    with pytest.raises(TypeError, match="judge must have a judge"):
        win_rate(["a"], ["b"], ["q"], [""], judge=object())
    with pytest.raises(ValueError, match="same length"):
        win_rate(["a"], ["b", "c"], ["q"], [""], judge=AlwaysA())
    with pytest.raises(ValueError, match="no examples"):
        win_rate([], [], [], [], judge=AlwaysA())


class FakeEmbedder:
    """Unit 2-d vectors from a lookup table (zeros for unknown / empty text)."""

    name = "fake"

    def __init__(self, table):
        self.table = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)
                      for k, v in table.items()}

    def encode(self, texts):
        return torch.stack([self.table.get(t, torch.zeros(2)) for t in texts])


def test_embedding_judge_hand_scores():
    emb = FakeEmbedder({"ref": (1, 0), "ctx": (0, 1), "a": (1, 0), "b": (0.6, 0.8), "b2": (0.8, 0.6),
                        "near": (0.59, 0.807)})
    j = EmbeddingJudge(emb)
    assert j.name == "embedding-similarity(fake; ref=0.5, ctx=0.5, tie_band=0.02)"
    # score(a) = .5*1 + .5*0 = .5 ; score(b) = .5*.6 + .5*.8 = .7
    assert j.judge("q", ["ctx"], "a", "b", reference="ref") == "B"
    # reference only (weight 1): a = 1, b = .6
    assert EmbeddingJudge(emb, reference_weight=1.0).judge("q", ["ctx"], "a", "b", reference="ref") == "A"
    # no reference: context term only: a = 0, b = .8
    assert j.judge("q", "ctx", "a", "b") == "B"
    # no context: reference term only
    assert j.judge("q", [], "a", "b", reference="ref") == "A"
    # b2 scores .7 like b: inside the tie band
    assert j.judge("q", ["ctx"], "b", "b2", reference="ref") == "tie"
    assert j.judge("q", ["ctx"], "b", "near", reference="ref") == "tie"
    assert EmbeddingJudge(emb, tie_band=0.0).judge("q", ["ctx"], "b", "near", reference="ref") == "A"
    # empty answers lose; two empty answers tie; nothing to compare against -> tie
    assert j.judge("q", ["ctx"], "", "b", reference="ref") == "B"
    assert j.judge("q", ["ctx"], "a", " ", reference="ref") == "A"
    assert j.judge("q", ["ctx"], "", "", reference="ref") == "tie"
    assert j.judge("q", [], "a", "b") == "tie"
    out = win_rate(["a", "b"], ["b", "a"], ["q", "q"], [["ctx"], ["ctx"]], judge=j)
    assert (out.wins, out.losses, out.judge) == (1, 1, j.name)


def test_embedding_judge_bad_arguments():
    with pytest.raises(ValueError, match="tie_band"):
        EmbeddingJudge(FakeEmbedder({}), tie_band=-1)
    with pytest.raises(ValueError, match="reference_weight"):
        EmbeddingJudge(FakeEmbedder({}), reference_weight=2)
    with pytest.raises(TypeError, match="embedder must have an encode"):
        EmbeddingJudge(object())


def test_default_judge_with_minilm():
    pytest.importorskip("transformers")
    try:
        from milp.models import find_default_embedder

        find_default_embedder()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    j = EmbeddingJudge()
    assert "all-MiniLM-L6-v2" in j.name
    v = j.embedder.encode(["I have chest pain.", "My chest hurts.", "The stock market fell today.", ""])
    assert v.shape == (4, 384)
    assert torch.allclose(v[:3].norm(dim=1), torch.ones(3), atol=1e-5) and v[3].abs().sum() == 0
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3
    out = win_rate(
        ["Rest your knee, ice it, and pause running for a week."],
        ["The stock market fell sharply today."],
        ["My knee hurts after running. What should I do?"],
        [["I run marathons.", "My knee hurts after long runs."]],
        ["Rest and ice the knee and take a break from running."],
    )
    assert (out.win_rate, out.n) == (100.0, 1) and "all-MiniLM-L6-v2" in out.judge


# --------------------------------------------------------------------------- LM judge
class _TextModel(torch.nn.Module):
    """A stand-in causal LM whose next-token logits for "A" / "B" follow a rule on the prompt text."""

    def __init__(self, tok, rule):
        super().__init__()
        self.tok, self.rule, self.w = tok, rule, torch.nn.Parameter(torch.zeros(1))
        self.ids = [tok.encode(c, add_special_tokens=False)[0] for c in "AB"]

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for i, row in enumerate(input_ids):
            a, b = self.rule(self.tok.decode(row[attention_mask[i].bool()]))
            logits[i, -1, self.ids[0]], logits[i, -1, self.ids[1]] = a, b
        return type("Out", (), {"logits": logits})()


def test_lm_judge_reads_both_orders(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer

    def likes_rest(text):  # prefers whichever position holds the answer that says "rest"
        return float("Response A: rest" in text), float("Response B: rest" in text)

    j = LMJudge(_TextModel(tok, likes_rest), tok, name="rule")
    assert j.name == "rule"
    assert j.judge("Knee?", ["I run."], "rest the knee", "buy a hat") == "A"
    assert j.judge("Knee?", ["I run."], "buy a hat", "rest the knee") == "B"
    assert j.judge("Knee?", ["I run."], "buy a hat", "wear a hat") == "tie"
    # a judge that only likes the first position ties everything: both orders cancel
    first = LMJudge(_TextModel(tok, lambda text: (5.0, 0.0)), tok)
    assert first.judge_batch(["q", "q"], ["c", "c"], ["rest x", "y"], ["z", "rest w"]) == ["tie", "tie"]
    # empty answers lose, two empty answers tie (the model is not asked)
    assert j.judge_batch(["q"] * 3, [""] * 3, ["", "a", " "], ["b", "", ""]) == ["B", "A", "tie"]
    out = win_rate(["rest now", "hat"], ["hat", "rest now"], ["q", "q"], [["c"], ["c"]], judge=j)
    assert (out.wins, out.losses, out.ties) == (1, 1, 0)


def test_lm_judge_on_a_real_model_is_batch_invariant_and_symmetric(tiny_checkpoint):
    j = LMJudge.from_pretrained(str(tiny_checkpoint), batch_size=2)
    assert j.name.startswith("lm-pairwise(tiny-llama")
    qs = ["My knee hurts.", "Headache for days?", "Is ibuprofen fine?"]
    ctx = [["I run daily."], ["I drink little water.", "I work late."], []]
    a = ["Rest the knee and ice it.", "Drink water and rest.", "Yes, for short-term pain."]
    b = ["See a doctor.", "Buy a hat.", "No."]
    prompts = [j._prompt(q, c, x, y, None) for q, c, x, y in zip(qs, ctx, a, b)]
    batched = j._letter_margins(prompts)  # left-padded batches of 2 ...
    single = [j._letter_margins([p])[0] for p in prompts]  # ... equal unpadded single prompts
    assert batched == pytest.approx(single, abs=1e-4)
    flip = {"A": "B", "B": "A", "tie": "tie"}
    assert j.judge_batch(qs, ctx, a, b) == [flip[v] for v in j.judge_batch(qs, ctx, b, a)]


def test_lm_judge_bad_arguments(tiny_chat_tokenizer):
    model = _TextModel(tiny_chat_tokenizer, lambda t: (0.0, 0.0))
    with pytest.raises(TypeError, match="model must be a causal LM"):
        LMJudge(object(), tiny_chat_tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        LMJudge(model, object())
    with pytest.raises(ValueError, match="tie_band"):
        LMJudge(model, tiny_chat_tokenizer, tie_band=-0.5)
    with pytest.raises(ValueError, match="batch_size"):
        LMJudge(model, tiny_chat_tokenizer, batch_size=0)


# ------------------------------------------------------------------------------------------------
# properties on drawn texts: the documented rules, against rouge_score itself and brute force

_WORDS = ["the", "I", "and", "don't", "Don’t", "it's", "I‘m", "you`re", "cat", "cats", "Cat", "run", "running",
          "runs", "knee", "KNEE", "pain", "hiking", "Hiking", "café", "CAFÉ", "ﬁsh", "Ｋｎｅｅ", "42kg", "½", "x²",
          "naïve", "straße", "menu_item", "über", "日本", "ǅemal", "İstanbul", "!!!", ""]
_SEPS = [" ", "  ", ", ", "! ", "-", "\n", "\t", "...", " — ", "_", "'", "’"]
_TEXT = st.lists(st.tuples(st.one_of(st.sampled_from(_WORDS), st.text(max_size=5)), st.sampled_from(_SEPS)),
                 max_size=7).map(lambda parts: "".join(w + s for w, s in parts))


def _reference_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=5), data=st.data())
def test_rouge_matches_rouge_score_and_its_documented_properties(pairs, data):
    scorer = _reference_scorer()
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ones = [rouge_scores([p], [r]) for p, r in pairs]
    for (p, r), one in zip(pairs, ones):
        s = scorer.score(r, p)
        assert one == {"rouge1": approx(100 * s["rouge1"].fmeasure, abs=1e-9),
                       "rougeL": approx(100 * s["rougeL"].fmeasure, abs=1e-9)}
        assert 0.0 <= one["rougeL"] <= one["rouge1"] + 1e-9 <= 100.0 + 1e-9  # an LCS is a common unigram multiset
        assert rouge_scores([r], [p]) == one  # F-measures are symmetric
        has_tokens = bool(scorer._tokenizer.tokenize(p)) and bool(scorer._tokenizer.tokenize(r))
        if not has_tokens:  # the empty rule: no token on either side -> 0
            assert one == {"rouge1": 0.0, "rougeL": 0.0}
        same = rouge_scores([p], [p])
        assert same == ({"rouge1": 100.0, "rougeL": 100.0} if scorer._tokenizer.tokenize(p)
                        else {"rouge1": 0.0, "rougeL": 0.0})
    # the corpus score is the mean over pairs, in any order
    corpus = rouge_scores(preds, refs)
    for k in ("rouge1", "rougeL"):
        assert corpus[k] == approx(sum(o[k] for o in ones) / len(ones), rel=1e-12, abs=1e-9)
    perm = data.draw(st.permutations(range(len(pairs))))
    shuffled = rouge_scores([preds[i] for i in perm], [refs[i] for i in perm])
    assert shuffled == {k: approx(v, rel=1e-12, abs=1e-9) for k, v in corpus.items()}


def _doc_content_tokens(text):
    """The module docstring's normalisation, written out independently of the regexes."""
    import unicodedata

    if not isinstance(text, str):
        text = " ".join(text)
    s = unicodedata.normalize("NFKC", text).lower()
    s = "".join(c for c in s if c not in "'’‘`")  # apostrophes deleted
    s = "".join(c if c.isalnum() else " " for c in s)  # any other non letter/digit -> space
    return [t for t in s.split() if t not in STOP_WORDS]


def _doc_f1(pred, content):
    from collections import Counter

    p, c = Counter(_doc_content_tokens(pred)), Counter(_doc_content_tokens(content))
    overlap = sum(min(n, c[w]) for w, n in p.items())
    if not p or not c or overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(c.values())
    return 100 * 2 * precision * recall / (precision + recall)


@settings(max_examples=150, deadline=None)
@given(pred=_TEXT, content=st.one_of(_TEXT, st.lists(_TEXT, max_size=3)), extra=st.lists(
    st.sampled_from(sorted(STOP_WORDS) + ["!", "...", " ", "—", "'s"]), max_size=4))
def test_persona_f1_follows_the_documented_rule(pred, content, extra):
    assert content_tokens(pred) == _doc_content_tokens(pred)
    assert content_tokens(content) == _doc_content_tokens(content)
    f = persona_f1_single(pred, content)
    assert f == approx(_doc_f1(pred, content), rel=1e-12, abs=1e-12)
    assert 0.0 <= f <= 100.0
    joined = content if isinstance(content, str) else " ".join(content)
    assert persona_f1_single(pred, joined) == f  # a list of strings is its items joined by spaces
    assert persona_f1_single(joined, pred) == approx(f, rel=1e-12)  # F1 is symmetric in response and content
    # stop words and punctuation carry no persona
    assert persona_f1_single(pred + " " + " ".join(extra), content) == f
    # a text against itself: 100 when it has a content token, else the empty rule's 0
    assert persona_f1_single(pred, pred) == (100.0 if _doc_content_tokens(pred) else 0.0)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(_TEXT, st.one_of(_TEXT, st.lists(_TEXT, max_size=3))), min_size=1, max_size=6),
       data=st.data())
def test_persona_f1_is_the_order_free_mean(rows, data):
    preds, contents = [p for p, _ in rows], [c for _, c in rows]
    mean = persona_f1(preds, contents)
    assert mean == approx(sum(persona_f1_single(p, c) for p, c in rows) / len(rows), rel=1e-12, abs=1e-12)
    perm = data.draw(st.permutations(range(len(rows))))
    assert persona_f1([preds[i] for i in perm], [contents[i] for i in perm]) == approx(mean, rel=1e-12, abs=1e-12)


class TableJudge:
    """Verdicts from a drawn table keyed by (answer_a, answer_b): any judge, biased or not."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return self.table.get((answer_a, answer_b), "tie")


class ScoreJudge(TableJudge):
    """An unbiased judge: the answer with the larger drawn score wins (equal scores tie)."""

    def judge(self, query, context, answer_a, answer_b, reference=None):
        a, b = self.table[answer_a], self.table[answer_b]
        return "tie" if a == b else ("A" if a > b else "B")


_FLIP = {"A": "B", "B": "A", "tie": "tie"}
_ANSWERS = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(st.tuples(_ANSWERS, _ANSWERS), min_size=1, max_size=8),
       table=st.dictionaries(st.tuples(_ANSWERS, _ANSWERS), st.sampled_from(["A", "B", "tie"])),
       scores=st.fixed_dictionaries({k: st.integers(0, 2) for k in "abcd"}), data=st.data())
def test_win_rate_counts_and_symmetries(pairs, table, scores, data):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    q, ctx = ["q"] * len(pairs), [["h"]] * len(pairs)
    n = len(pairs)
    # any judge: the counts are the verdicts'; with swap=True a verdict stands only when the swapped one agrees
    for swap in (False, True):
        verdicts = [TableJudge(table).judge("q", "h", x, y) for x, y in pairs]
        if swap:
            verdicts = [v if v == _FLIP[TableJudge(table).judge("q", "h", y, x)] else "tie"
                        for v, (x, y) in zip(verdicts, pairs)]
        out = win_rate(a, b, q, ctx, judge=TableJudge(table), swap=swap)
        assert (out.wins, out.losses, out.ties, out.n) == (verdicts.count("A"), verdicts.count("B"),
                                                           verdicts.count("tie"), n)
        assert out.win_rate == approx(100 * (out.wins + out.ties / 2) / n) and 0 <= out.win_rate <= 100
    # an unbiased judge: swapping the sides mirrors the result, and swap=True changes nothing
    fair = ScoreJudge(scores)
    fwd, back = win_rate(a, b, q, ctx, judge=fair), win_rate(b, a, q, ctx, judge=fair)
    assert (back.wins, back.losses, back.ties) == (fwd.losses, fwd.wins, fwd.ties)
    assert fwd.win_rate + back.win_rate == approx(100.0)
    assert win_rate(a, b, q, ctx, judge=fair, swap=True) == fwd
    perm = data.draw(st.permutations(range(n)))
    assert win_rate([a[i] for i in perm], [b[i] for i in perm], q, ctx, judge=fair) == fwd


# unit 2-d embeddings at drawn angles (whole degrees: distinct cosines, and exact ties when angles repeat)
_ANGLE = st.integers(0, 359).map(lambda d: (math.cos(math.radians(d)), math.sin(math.radians(d))))
_VECS = st.fixed_dictionaries({k: _ANGLE for k in ("a", "b", "c", "r", "h1", "h2")})


@settings(max_examples=60, deadline=None)
@given(vecs=_VECS, answers=st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"])),
       context=st.sampled_from([[], ["h1"], ["h1", "h2"], ["h2", "h1"], ["", "h2"]]),
       reference=st.sampled_from([None, "", " \n", "r"]), weight=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]),
       band=st.sampled_from([0.0, 0.02, 0.3]))
def test_embedding_judge_follows_its_score_rule_and_is_antisymmetric(vecs, answers, context, reference, weight,
                                                                    band):
    emb = FakeEmbedder(vecs)
    j = EmbeddingJudge(emb, tie_band=band, reference_weight=weight)
    x, y = answers
    v = j.judge("q", context, x, y, reference=reference)
    assert v == _FLIP[j.judge("q", context, y, x, reference=reference)]
    ctx = [c for c in context if c.strip()]
    reference = reference if reference and reference.strip() else None  # blank: no reference
    if x == y or (not ctx and not reference):  # the same answer, or nothing to compare against
        assert v == "tie"
        return

    def score(ans):  # the class docstring's rule: a term alone counts whole, whatever the weight
        cos = {t: float(emb.table[ans] @ emb.table[t]) for t in [*ctx, "r"]}
        ref_term, ctx_term = cos["r"], max((cos[c] for c in ctx), default=None)
        if not reference:
            return ctx_term
        return ref_term if ctx_term is None else weight * ref_term + (1 - weight) * ctx_term

    d = score(x) - score(y)
    if abs(abs(d) - band) > 1e-6:  # clear of the tie band's edge (rounding)
        assert v == ("tie" if abs(d) <= band else "A" if d > 0 else "B")


@settings(max_examples=30, deadline=None)
@given(vecs=_VECS, answers=st.tuples(st.sampled_from(["a", "", " ", "\n"]), st.sampled_from(["b", "", " \t"])),
       context=st.sampled_from([["h1"], ["h1", "h2"]]), reference=st.sampled_from([None, "r"]), swap=st.booleans())
def test_embedding_judge_empty_answers_lose(vecs, answers, context, reference, swap):
    x, y = answers[::-1] if swap else answers
    v = EmbeddingJudge(FakeEmbedder(vecs)).judge("q", context, x, y, reference=reference)
    if not x.strip() or not y.strip():
        assert v == ("tie" if not x.strip() and not y.strip() else "B" if not x.strip() else "A")


# --------------------------------------------------------------------------- paired differences
@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(" abc", max_size=12), st.text(" abcd", max_size=12)), min_size=1,
                      max_size=6))
def test_rouge_per_example_is_what_rouge_scores_averages(pairs):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    each, mean = rouge_per_example(preds, refs), rouge_scores(preds, refs)
    for key in ("rouge1", "rougeL"):
        assert len(each[key]) == len(pairs) and all(0 <= v <= 100 for v in each[key])
        assert sum(each[key]) / len(pairs) == approx(mean[key], abs=1e-9)


def test_paired_difference_on_hand_computed_cases():
    d = paired_difference([3.0, 4.0, 5.0, 6.0], [1.0, 2.5, 4.0, 4.0])
    # four positive differences: 2 of the 16 sign patterns are as extreme, exactly
    assert (d.mean, d.n, d.p_value, d.confidence) == (1.625, 4, 0.125, 0.95)
    assert d.ci_low <= d.mean <= d.ci_high and d.ci_low >= 1.0 and d.ci_high <= 2.0
    assert paired_difference([1, 1, 1], [0, 0, 0]).to_dict() == {
        "mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "p_value": 0.25, "n": 3, "confidence": 0.95}
    assert paired_difference([2.0, 5.0], [2.0, 5.0]).p_value == 1.0
    one = paired_difference([2.0], [0.5])
    assert (one.mean, one.ci_low, one.ci_high, one.p_value) == (1.5, None, None, None)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=2, max_size=11),
       shift=st.floats(-20, 20))
@example(rows=[(0.0, 4.017779471217397e-69), (0.0, 4.017779471217397e-69)], shift=1.0)  # found in a full run
def test_paired_difference_is_antisymmetric_and_shift_free(rows, shift):
    a, b = [x for x, _ in rows], [y for _, y in rows]
    d, back = paired_difference(a, b), paired_difference(b, a)
    assert d.mean == approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-9)
    assert back.mean == approx(-d.mean, abs=1e-9) and back.p_value == approx(d.p_value, abs=1e-9)
    assert 0 < d.p_value <= 1 and d.ci_low - 1e-9 <= d.ci_high
    # shift-free where shifting keeps the differences in floating point: 0.0 - 4e-69 is not 0,
    # (0.0 + 1) - (4e-69 + 1) is, and the test then rightly sees no difference at all
    assume(all((x + shift) - (y + shift) == x - y or abs((x + shift) - (y + shift) - (x - y)) <= 1e-9 * abs(x - y)
               for x, y in rows))
    moved = paired_difference([x + shift for x in a], [y + shift for y in b])
    assert moved.p_value == approx(d.p_value, abs=1e-6)
    assert moved.mean == approx(d.mean, abs=1e-6)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"a": [], "b": []}, ValueError, "empty"),
    ({"a": [1.0], "b": [1.0, 2.0]}, ValueError, "same length"),
    ({"a": [1.0, math.nan], "b": [1.0, 2.0]}, ValueError, r"a\[1\] must be a finite number"),
    ({"a": [1.0, 2.0], "b": [True, 2.0]}, ValueError, r"b\[0\] must be a finite number"),
    ({"a": "12", "b": [1.0, 2.0]}, TypeError, "a must be a sequence of numbers"),
    ({"a": [1.0, 2.0], "b": [1.0, 2.0], "confidence": 1.0}, ValueError, "confidence"),
    ({"a": [1.0, 2.0], "b": [1.0, 2.0], "n_resamples": 0}, ValueError, "n_resamples"),
])
def test_paired_difference_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        paired_difference(**kwargs)
