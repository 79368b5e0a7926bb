"""Sampled decoding (milp.sampling): generate()'s distribution (temperature, top-k, top-p, min-p
as transformers' warpers shape it), one seeded generator per row, so that a request's answer
depends on its seed and not on the rows beside it, in generate_responses and ContinuousBatch alike."""
from __future__ import annotations

import math

import pytest
import torch
from test_pipeline import _three_users
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import milp
from milp.decode import ContinuousBatch
from milp.pipeline import _answer_text, _instruction_examples, _pad_id, generate_responses
from milp.sampling import MAX_SEED, Sampling, _filtered, pick_tokens, row_sampler, sampling_per_record


def hf_filtered(scores: torch.Tensor, s: Sampling) -> torch.Tensor:
    """transformers' warpers, in generate()'s order, on one row."""
    out = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k:
        out = TopKLogitsWarper(s.top_k)(None, out)
    if s.top_p < 1:
        out = TopPLogitsWarper(s.top_p)(None, out)
    if s.min_p:
        out = MinPLogitsWarper(s.min_p)(None, out)
    return out


SETTINGS = [Sampling(0.7), Sampling(1.3, top_k=5), Sampling(1.0, top_p=0.6), Sampling(0.9, min_p=0.2),
            Sampling(0.5, top_k=20, top_p=0.9, min_p=0.05), Sampling(2.0, top_k=1), Sampling(1.0, top_k=1000)]


def test_the_filtered_scores_are_generates_for_every_row_of_a_mixed_call():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(SETTINGS), 300, generator=g) * 1.5
    rows = [row_sampler(Sampling(**{**s.__dict__, "seed": i})) for i, s in enumerate(SETTINGS)]
    got = _filtered(logits, rows)
    for i, s in enumerate(SETTINGS):
        want = hf_filtered(logits[i:i + 1], s)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want[0])), s
        torch.testing.assert_close(got[i][torch.isfinite(got[i])], want[0][torch.isfinite(want[0])])
    kept = torch.isfinite(got).sum(1).tolist()
    assert kept[1] == 5 and kept[5] == 1 and kept[6] == 300 and 1 < kept[2] < 300 and 1 < kept[3] < 300


def test_sampled_tokens_follow_the_filtered_distribution():
    """20000 draws of one row: each token's share within 5 standard deviations of its
    probability, and a token the filters drop never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    for s in (Sampling(1.0, seed=1), Sampling(0.6, top_k=4, seed=2), Sampling(1.4, top_p=0.8, seed=3),
              Sampling(1.0, min_p=0.3, seed=4)):
        row = row_sampler(s)
        n = 20000
        counts = torch.bincount(torch.cat([pick_tokens(logits, [row]) for _ in range(n)]), minlength=6).double()
        probs = hf_filtered(logits, s).softmax(-1)[0].double()
        assert torch.all(counts[probs == 0] == 0), s
        sd = (n * probs * (1 - probs)).sqrt()
        assert torch.all((counts - n * probs).abs() <= 5 * sd + 1e-9), (s, counts.tolist(), (n * probs).tolist())


def test_a_seed_repeats_its_tokens_and_the_rows_beside_it_change_nothing():
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 50, generator=g) for _ in range(30)]
    s = Sampling(1.0, top_p=0.95, seed=1234)

    def run(rows, row):  # the seeded row gets logits x[0] at its place `row`
        order = [1, 2, 3][:row] + [0] + [1, 2, 3][row:len(rows) - 1]
        return [pick_tokens(x[order], rows)[row].item() for x in steps]

    alone = run([row_sampler(s)], 0)
    beside = run([None, row_sampler(Sampling(0.8, seed=9)), row_sampler(s), row_sampler(Sampling(1.5))], 2)
    assert alone == beside
    assert alone != [x[0].argmax().item() for x in steps]  # it samples
    other_seed = run([row_sampler(Sampling(1.0, top_p=0.95, seed=1235))], 0)
    assert alone != other_seed


def test_greedy_rows_take_the_most_likely_token_and_draw_nothing():
    logits = torch.randn(3, 40)
    rows = [None, row_sampler(Sampling(0.0, seed=5)), row_sampler(Sampling(1.0, seed=5))]
    assert rows[1] is None  # temperature 0: greedy
    state = rows[2].generator.get_state()
    picked = pick_tokens(logits[:2], rows[:2])
    assert picked.tolist() == logits[:2].argmax(-1).tolist()
    assert torch.equal(rows[2].generator.get_state(), state)
    assert pick_tokens(logits.to(torch.bfloat16), [None] * 3).dtype == torch.long


def test_an_unseeded_row_draws_its_seed_from_torchs_generator():
    torch.manual_seed(0)
    a = Sampling(1.0).resolved().seed
    torch.manual_seed(0)
    assert Sampling(1.0).resolved().seed == a and 0 <= a <= MAX_SEED
    assert Sampling(1.0, seed=3).resolved() == Sampling(1.0, seed=3)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.0), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.5), r"min_p must be a number in \[0, 1\]"),
    (dict(seed=-1), "seed must be an int in"),
    (dict(seed=2**63), "seed must be an int in"),
    (dict(seed=1.0), "seed"),
])
def test_out_of_range_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw)


def test_bad_sampling_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="sampling must be a milp.Sampling or None, got dict"):
        row_sampler({"temperature": 1.0})
    with pytest.raises(ValueError, match="one Sampling .or None. per record: got 1 for 2"):
        sampling_per_record([Sampling()], 2)
    with pytest.raises(TypeError, match=r"sampling\[1\] must be a milp.Sampling or None, got float"):
        sampling_per_record([None, 0.5], 2)
    with pytest.raises(ValueError, match="logits must be .rows, vocab. with one row per sampler"):
        pick_tokens(torch.zeros(2, 5), [None])
    assert milp.Sampling is Sampling


def _prompts(tok, recs, max_length=384):
    return [e["input_ids"] for e in _instruction_examples(recs, tok, None, max_length, add_response=False)]


def test_generate_responses_samples_each_record_as_alone_and_as_continuous_batching(tiny_chat_tokenizer):
    """A record's sampled answer is the same in a mixed batch, alone, and from ContinuousBatch
    with rows joining at other steps; other seeds give other answers, greedy rows stay greedy."""
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    kw = dict(runtime=rt, max_new_tokens=10, progress=False)
    sampling = [Sampling(1.0, seed=11), None, Sampling(0.8, top_p=0.9, top_k=50, seed=12)]
    mixed = generate_responses(model, tok, recs, sampling=sampling, batch_size=3, **kw)
    alone = [generate_responses(model, tok, [r], sampling=s, **kw)[0] for r, s in zip(recs, sampling)]
    assert mixed == alone
    assert mixed[1] == generate_responses(model, tok, recs[1:2], **kw)[0]  # None: greedy
    reseeded = generate_responses(model, tok, recs, batch_size=3, **kw,
                                  sampling=[Sampling(1.0, seed=21), None, Sampling(0.8, top_p=0.9, top_k=50, seed=22)])
    assert reseeded[1] == mixed[1] and (reseeded[0], reseeded[2]) != (mixed[0], mixed[2])

    batch = ContinuousBatch(model, runtime=rt, eos_token_id=tok.eos_token_id, pad_token_id=_pad_id(tok), max_rows=3)
    prompts = _prompts(tok, recs)
    joins = {0: [2], 3: [0, 1]}  # record 2 first, the others three steps later
    tokens: dict[int, list[int]] = {}
    step = 0
    while len(batch) or step <= 3:
        for i in joins.get(step, []):
            batch.join(i, prompts[i], 10, recs[i].user_id, sampling=sampling[i])
        for u in batch.step():
            assert u.error is None
            tokens[u.key] = u.tokens
        step += 1
    assert [_answer_text(tok, tokens[i]) for i in range(3)] == mixed


def test_an_unseeded_record_draws_its_seed_where_it_starts(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    kw = dict(runtime=rt, max_new_tokens=8, progress=False, sampling=Sampling(1.2))
    torch.manual_seed(5)
    a = generate_responses(model, tok, recs, **kw)
    torch.manual_seed(5)
    assert generate_responses(model, tok, recs, **kw) == a
    with pytest.raises(TypeError, match="sampling must be a milp.Sampling, None, or a sequence"):
        generate_responses(model, tok, recs, runtime=rt, sampling="greedy", progress=False)
