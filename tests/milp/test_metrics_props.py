"""Property tests of milp.metrics on any Unicode text: ROUGE is rouge_score's F-measure ×100, in
[0, 100], never NaN, symmetric, 100 for a text with tokens against itself; Persona-F1 lies in
[0, 100], is symmetric, and refuses a user content that is neither a string nor a list of strings
with a TypeError naming ``user_contents[i]``; win_rate counts every verdict once (wins + losses +
ties = n, ties half), refuses a judge_batch that returns another number of verdicts than examples
and any verdict other than "A"/"B"/"tie" (with swap=True too, from either pass), and names a bad
``contexts[i]``; the LM judge reads a blank reference as no reference, as the embedding judge does."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics import _TextModel  # tests/milp is on sys.path (pytest's rootdir-relative import)

from milp.metrics import EmbeddingJudge, LMJudge, persona_f1, persona_f1_single, rouge_scores, win_rate

SETTINGS = settings(max_examples=60, deadline=None)

_WORDS = ["the", "cat", "cats", "running", "Run", "knee", "pain", "don't", "café", "日本", "x²", "!!", "", "42"]
_text = st.one_of(st.text(max_size=12), st.lists(st.sampled_from(_WORDS), max_size=6).map(" ".join))


@SETTINGS
@given(pairs=st.lists(st.tuples(_text, _text), min_size=1, max_size=4))
def test_rouge_is_rouge_score_bounded_and_symmetric(pairs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for p, r in pairs:
        got = rouge_scores([p], [r])
        ref = scorer.score(r, p)
        assert got == {k: pytest.approx(100 * ref[k].fmeasure, abs=1e-9) for k in ("rouge1", "rougeL")}
        assert all(not math.isnan(v) and 0.0 <= v <= 100.0 for v in got.values())
        assert rouge_scores([r], [p]) == got
        tokens = scorer._tokenizer.tokenize(p)
        assert rouge_scores([p], [p]) == ({"rouge1": 100.0, "rougeL": 100.0} if tokens else
                                          {"rouge1": 0.0, "rougeL": 0.0})
    both = rouge_scores([p for p, _ in pairs], [r for _, r in pairs])
    assert all(0.0 <= v <= 100.0 for v in both.values())


_bad_content = st.sampled_from([None, 3, b"bytes", ["ok", None], [b"x"], {"a": "b"}, ("x", 2)])


@SETTINGS
@given(preds=st.lists(_text, min_size=1, max_size=4), data=st.data())
def test_persona_f1_bounds_symmetry_and_named_errors(preds, data):
    contents = [data.draw(st.one_of(_text, st.lists(_text, max_size=3))) for _ in preds]
    for p, c in zip(preds, contents):
        f = persona_f1_single(p, c)
        assert 0.0 <= f <= 100.0 and not math.isnan(f)
        joined = c if isinstance(c, str) else " ".join(c)
        assert persona_f1_single(joined, p) == pytest.approx(f, rel=1e-12)
    mean = persona_f1(preds, contents)
    assert 0.0 <= mean <= 100.0
    k = data.draw(st.integers(0, len(preds) - 1))
    bad = data.draw(_bad_content)
    broken = [*contents[:k], bad, *contents[k + 1:]]
    with pytest.raises(TypeError, match=rf"user_contents\[{k}\]"):
        persona_f1(preds, broken)
    with pytest.raises(TypeError, match="user_content"):
        persona_f1_single(preds[0], bad)


class TableJudge:
    """Verdicts from a drawn table keyed by (answer_a, answer_b); optionally a judge_batch of drawn length."""

    name = "table"

    def __init__(self, table, batch_len=None):
        self.table, self.batch_len = table, batch_len
        if batch_len is not None:
            self.judge_batch = self._batch

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return self.table.get((answer_a, answer_b), "tie")

    def _batch(self, queries, contexts, answers_a, answers_b, references):
        out = [self.judge(q, c, a, b, r) for q, c, a, b, r in zip(queries, contexts, answers_a, answers_b, references)]
        return (out * 2)[: self.batch_len]


_ANSWERS = st.sampled_from(["a", "b", "c"])
_VERDICTS = st.sampled_from(["A", "B", "tie"])


@SETTINGS
@given(pairs=st.lists(st.tuples(_ANSWERS, _ANSWERS), min_size=1, max_size=6),
       table=st.dictionaries(st.tuples(_ANSWERS, _ANSWERS), _VERDICTS), swap=st.booleans(), data=st.data())
def test_win_rate_counts_each_verdict_once_and_refuses_bad_judges(pairs, table, swap, data):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    n = len(pairs)
    q, ctx = ["q"] * n, [["my knee"]] * n
    out = win_rate(a, b, q, ctx, judge=TableJudge(table), swap=swap)
    assert out.wins + out.losses + out.ties == out.n == n
    assert out.win_rate == pytest.approx(100 * (out.wins + out.ties / 2) / n) and 0 <= out.win_rate <= 100
    assert win_rate(a, b, q, ctx, judge=TableJudge(table, batch_len=n), swap=swap) == out
    # a judge_batch answering for fewer or more examples is refused, not counted as ties
    wrong = data.draw(st.integers(0, 2 * n).filter(lambda m: m != n))
    with pytest.raises(ValueError, match=f"returned {wrong} verdicts for {n} examples"):
        win_rate(a, b, q, ctx, judge=TableJudge(table, batch_len=wrong), swap=swap)
    # a verdict that is not A/B/tie is refused, whichever pass gives it
    bad_pair = data.draw(st.sampled_from(pairs))
    bad = data.draw(st.sampled_from(["a", "draw", "", None, "TIE", 1]))
    flip = data.draw(st.booleans()) and swap  # the bad verdict only in the swapped pass
    bad_table = {**table, (bad_pair[::-1] if flip else bad_pair): bad}
    with pytest.raises(ValueError, match="expected 'A', 'B' or 'tie'"):
        win_rate(a, b, q, ctx, judge=TableJudge(bad_table), swap=swap)
    # a context that is neither text nor a list of texts is named
    k = data.draw(st.integers(0, n - 1))
    with pytest.raises(TypeError, match=rf"contexts\[{k}\]"):
        win_rate(a, b, q, [*ctx[:k], data.draw(_bad_content), *ctx[k + 1:]], judge=TableJudge(table))


def _with_reference_a_wins(text):
    """Prefers position A whenever the prompt shows a reference: a judge that reads one takes a side."""
    shown = "(reference)" in text
    return (1.0 if shown and "Response A: x" in text else 0.0), (1.0 if shown and "Response B: x" in text else 0.0)


@settings(max_examples=20, deadline=None)
@given(blank=st.sampled_from(["", " ", "\n\t", "   \n"]), answers=st.permutations(["x good", "y bad"]))
def test_lm_judge_reads_a_blank_reference_as_none(tiny_chat_tokenizer, blank, answers):
    j = LMJudge(_TextModel(tiny_chat_tokenizer, _with_reference_a_wins), tiny_chat_tokenizer)
    x, y = answers
    assert j.judge("q", ["ctx"], x, y, reference=blank) == j.judge("q", ["ctx"], x, y) == "tie"
    assert j.judge("q", ["ctx"], x, y, reference="a real reference") == ("A" if x.startswith("x") else "B")
    emb = EmbeddingJudge(type("E", (), {"encode": lambda self, t: torch.eye(len(t), 4)})())
    assert emb.judge("q", [], x, y, reference=blank) == "tie"  # the embedding judge: no reference, no context
