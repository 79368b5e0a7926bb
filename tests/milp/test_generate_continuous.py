"""``generate_responses(batching="continuous")``: records join a ContinuousBatch as answers end,
with the answers, streams, stops and samples of the static batches, and fewer forward passes
where answers end early; ``auto`` falls back to static where continuous batching cannot decode."""
from __future__ import annotations

import collections

import pytest
import torch
from test_pipeline import _NoEos, _stored_users, _three_users  # tests/milp is on sys.path

from milp.data import Record
from milp.pipeline import PrefixEncoder, _instruction_examples, generate_responses
from milp.sampling import Sampling


class _EosAs(_NoEos):
    """The tokenizer with another end-of-text token (one the tiny model says mid-answer)."""

    def __init__(self, tok, eos: int) -> None:
        super().__init__(tok)
        self.eos_token_id = eos


def _counted(model, fn):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        handle.remove()


def _mixed(tok):
    """Six records of three users, prompts of different lengths, and an end-of-text token that
    ends some answers early."""
    model, rt, recs = _three_users(max_users=4)
    recs = recs + [Record(f"u{i % 3}", "", ["x"], q, "ok") for i, q in enumerate(
        ["Why?", "What should I eat when I have a cold and a sore throat?", "Is it bad?"])]
    model.generation_config.eos_token_id = None
    said = collections.Counter()
    for r, e in zip(recs, _instruction_examples(recs, tok, None, 384, add_response=False)):
        out = rt.generate(torch.tensor([e["input_ids"]]), [r.user_id], max_new_tokens=12, do_sample=False,
                          pad_token_id=0)
        said.update(out[0, len(e["input_ids"]) + 1:].tolist())
    return model, rt, recs, _EosAs(tok, said.most_common(1)[0][0])  # the token said most, after the first


def test_continuous_batching_gives_the_static_answers_in_fewer_steps(tiny_chat_tokenizer):
    model, rt, recs, tok = _mixed(tiny_chat_tokenizer)
    limits = [12, 2, 9, 3, 12, 1]
    kw = dict(runtime=rt, max_new_tokens=limits, batch_size=3, progress=False)
    static, static_calls = _counted(model, lambda: generate_responses(model, tok, recs, **kw))
    cont, cont_calls = _counted(model, lambda: generate_responses(model, tok, recs, batching="continuous", **kw))
    assert cont == static
    assert sum(len(a) < len(b) for a, b in zip(static, generate_responses(
        model, _NoEos(tiny_chat_tokenizer), recs, **kw))) >= 1, "precondition: the end-of-text token ends some early"
    assert cont_calls < static_calls  # a record took an ended one's place
    assert generate_responses(model, tok, recs, batching="auto", **kw) == static
    assert generate_responses(model, tok, [], batching="continuous", progress=False) == []


def test_streams_stops_and_samples_are_the_static_ones(tiny_chat_tokenizer):
    model, rt, recs, tok = _mixed(tiny_chat_tokenizer)
    kw = dict(runtime=rt, max_new_tokens=10, batch_size=2, progress=False,
              sampling=[Sampling(1.0, seed=i) if i % 2 else None for i in range(len(recs))])
    got = {}
    for batching in ("static", "continuous"):
        asked: dict[int, int] = {}
        streamed: dict[int, list[str]] = {}

        def stop(i: int, asked=asked) -> bool:
            asked[i] = asked.get(i, 0) + 1
            return i == 2 and asked[i] == 3

        answers = generate_responses(model, tok, recs, batching=batching, stop=stop,
                                     stream=lambda i, text, s=streamed: s.setdefault(i, []).append(text), **kw)
        got[batching] = answers, streamed, asked[2]
    assert got["continuous"] == got["static"]
    answers, streamed, _ = got["static"]
    assert all(streamed[i][-1] == a for i, a in enumerate(answers) if a)
    assert answers[1] != generate_responses(model, tok, recs[1:2], runtime=rt, max_new_tokens=10, progress=False)[0]


def test_a_store_with_fewer_slots_than_users(tiny_chat_tokenizer, tmp_path):
    tok = tiny_chat_tokenizer
    full, rt, recs = _stored_users(tmp_path)
    kw = dict(max_new_tokens=[6, 2, 5, 1, 4], batch_size=4, progress=False)
    want = generate_responses(full.model, tok, recs, runtime=full, **kw)
    assert generate_responses(rt.model, tok, recs, runtime=rt, batching="continuous", **kw) == want
    assert len(rt.users) <= 2 and rt.cache_info().loads >= 5
    with pytest.raises(KeyError, match="unknown user 'nobody'"):
        generate_responses(rt.model, tok, [Record("nobody", "", ["h"], "q", "r")], runtime=rt, batching="continuous",
                           progress=False)


class _Prefix(PrefixEncoder):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.vec = torch.nn.Parameter(torch.randn(1, 2, hidden))

    def forward(self, records):  # [B, 2, hidden]: two soft tokens before each prompt
        return self.vec.expand(len(records), -1, -1)


def test_auto_falls_back_where_continuous_batching_cannot_decode(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    kw = dict(max_new_tokens=4, progress=False)
    static = generate_responses(model, tok, recs, **kw)
    model.generation_config.repetition_penalty = 1.3
    penalized = generate_responses(model, tok, recs, **kw)
    assert generate_responses(model, tok, recs, batching="auto", **kw) == penalized
    with pytest.raises(ValueError, match="batching='continuous': the model cannot be decoded so: its generation "
                                         "config sets repetition_penalty=1.3"):
        generate_responses(model, tok, recs, batching="continuous", **kw)
    model.generation_config.repetition_penalty = 1.0
    assert generate_responses(model, tok, recs, batching="auto", **kw) == static
    prefix = _Prefix(model.config.hidden_size)
    with_prefix = generate_responses(model, tok, recs, prefix=prefix, **kw)
    assert generate_responses(model, tok, recs, prefix=prefix, batching="auto", **kw) == with_prefix
    with pytest.raises(ValueError, match="a prefix encoder gives the prompts as embeddings"):
        generate_responses(model, tok, recs, prefix=prefix, batching="continuous", **kw)
    with pytest.raises(ValueError, match="batching must be 'static', 'continuous' or 'auto', got 'paged'"):
        generate_responses(model, tok, recs, batching="paged", **kw)


def _alone(rt, tok, recs, limits):
    """Each record generated alone by ``generate``: its new tokens and why it ended (the reference)."""
    out = []
    for r, e, n in zip(recs, _instruction_examples(recs, tok, None, 384, add_response=False), limits):
        ids = e["input_ids"]
        new = rt.generate(torch.tensor([ids]), [r.user_id], max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        out.append((len(ids), len(new), "stop" if new[-1] == tok.eos_token_id else "length"))
    return out


def test_answers_carry_their_token_counts_and_why_they_ended(tiny_chat_tokenizer):
    """Every answer is an ``Answer``: its prompt's tokens, its new tokens (the end-of-text token
    counted) and its finish reason, those ``generate`` gives each record alone, with either
    batching; a stop string ends one with ``"stop"``, ``stop(i)`` with ``"cancelled"``."""
    import copy
    import json
    import pickle

    from milp.pipeline import Answer

    model, rt, recs, tok = _mixed(tiny_chat_tokenizer)
    limits = [12, 2, 9, 3, 12, 1]
    want = _alone(rt, tok, recs, limits)
    assert {w[2] for w in want} == {"stop", "length"}, "precondition: answers of both ends"
    kw = dict(runtime=rt, max_new_tokens=limits, batch_size=3, progress=False)
    for batching in ("static", "continuous"):
        got = generate_responses(model, tok, recs, batching=batching, **kw)
        assert all(type(a) is Answer for a in got)
        assert [(a.prompt_tokens, a.new_tokens, a.finish_reason) for a in got] == want, batching
    a = got[0]
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), copy.copy(a)):
        assert (b, b.prompt_tokens, b.new_tokens, b.finish_reason) == (a, a.prompt_tokens, a.new_tokens,
                                                                        a.finish_reason)
    assert json.loads(json.dumps({"a": a})) == {"a": str(a)}
    # a stop string: the answer ends with "stop" at the token that completed it
    plain = generate_responses(model, _NoEos(tiny_chat_tokenizer), recs, **kw)
    at = next(i for i, p in enumerate(plain) if len(p.strip()) > 3 and limits[i] >= 9)
    stop_string = plain[at].strip()[2:4]
    for batching in ("static", "continuous"):
        cut = generate_responses(model, _NoEos(tiny_chat_tokenizer), recs, batching=batching,
                                 stop_strings=[stop_string], **kw)[at]
        assert (cut.finish_reason, str(cut)) == ("stop", plain[at].split(stop_string)[0].strip())
        assert cut.new_tokens < plain[at].new_tokens == limits[at]
        # stop(i) ends record `at` after its third token
        ended = generate_responses(model, _NoEos(tiny_chat_tokenizer), recs, batching=batching,
                                   stop=lambda i, n={}: i == at and n.setdefault(i, []).append(1) is None
                                   and len(n[i]) >= 3, **kw)[at]
        assert (ended.new_tokens, ended.finish_reason) == (3, "cancelled"), batching
