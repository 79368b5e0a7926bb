"""Token log-probabilities (``generate_responses(logprobs=)``, ``ContinuousBatch.join(logprobs=)``):
each generated token's, with its most likely alternatives, are the model's own (the log-softmax
of the logits a teacher-forced forward of the prompt and the answer gives, with the record's
user's adapters), the same with either batching, greedy or sampled."""
from __future__ import annotations

import pytest
import torch
from test_pipeline import _three_users  # tests/milp is on sys.path

import milp
from milp.decode import ContinuousBatch
from milp.pipeline import _instruction_examples, generate_responses


def _teacher_forced(model, rt, user, prompt, tokens):
    """Log-softmax at each generated token's place, from one forward of prompt + tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad(), rt.using([user]):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_logprobs_are_the_models_own_with_either_batching(tiny_chat_tokenizer, batching):
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    sampling = [None, milp.Sampling(0.9, top_p=0.9, seed=3), None]
    kw = dict(runtime=rt, max_new_tokens=[12, 9, 6], batch_size=3, progress=False, sampling=sampling)
    plain = generate_responses(model, tok, recs, **kw)
    got = generate_responses(model, tok, recs, logprobs=[3, 0, None], batching=batching, **kw)
    assert got == plain and got[2].logprobs is None and plain[0].logprobs is None  # same answers; asked rows only
    prompts = [e["input_ids"] for e in _instruction_examples(recs, tok, None, 384, add_response=False)]
    for i in (0, 1):
        lps = got[i].logprobs
        assert lps is not None and len(lps) == got[i].new_tokens > 0
        tokens = [e.token for e in lps]
        assert tok.decode(tokens, skip_special_tokens=True).strip() == got[i]
        ref = _teacher_forced(model, rt, recs[i].user_id, prompts[i], tokens)
        want = ref.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert [e.logprob for e in lps] == pytest.approx(want.tolist(), abs=1e-4)
        if i == 0:  # greedy, 3 alternatives: the chosen token is the first of them
            top = ref.topk(3, dim=-1)
            assert all(len(e.top) == 3 and e.top[0] == (e.token, e.logprob) for e in lps)
            assert [[t for t, _ in e.top] for e in lps] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([[v for _, v in e.top] for e in lps]), top.values,
                                       atol=1e-4, rtol=0)
        else:  # sampled, no alternatives asked for
            assert all(e.top == () for e in lps)


def test_logprobs_match_across_batchings_and_pickle(tiny_chat_tokenizer):
    import pickle

    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    kw = dict(runtime=rt, max_new_tokens=8, batch_size=2, progress=False, logprobs=2)
    static = generate_responses(model, tok, recs, batching="static", **kw)
    cont = generate_responses(model, tok, recs, batching="continuous", **kw)
    for a, b in zip(static, cont):
        assert a == b and [e.token for e in a.logprobs] == [e.token for e in b.logprobs]
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-4)
        assert pickle.loads(pickle.dumps(a)).logprobs == a.logprobs


def test_static_logprobs_hold_one_steps_logits_not_every_steps(tiny_chat_tokenizer, monkeypatch):
    """Static batching reads each step's logits as the model's forward gives them
    (milp.sampling.LogprobSteps): generate is not asked to keep every step's logits
    (output_logits: steps x rows x vocabulary floats), the hook is gone afterwards, and the
    logprobs are those of generate's own output_logits, step for step."""
    from milp.sampling import LogprobSteps, token_logprobs

    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    asked: list[dict] = []
    real = type(model).generate

    def spy(self, *a, **kw):
        asked.append(dict(kw))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "generate", spy)
    got = generate_responses(model, tok, recs, runtime=rt, max_new_tokens=[10, 4, 7], batch_size=3, progress=False,
                             logprobs=[2, None, 1], batching="static")
    assert len(asked) == 1 and not asked[0].get("output_logits") and not asked[0].get("return_dict_in_generate")
    assert not model._forward_hooks  # removed
    kw = {k: v for k, v in asked[0].items() if k not in ("stopping_criteria", "streamer", "cache", "past_key_values")}
    with rt.using([r.user_id for r in recs]):  # generate's own logits, all steps kept
        ref = real(model, **kw, output_logits=True, return_dict_in_generate=True)
    offset = kw["input_ids"].shape[1]
    for i, tops in ((0, 2), (2, 1)):
        assert got[i].logprobs is not None
        tokens = [e.token for e in got[i].logprobs]
        j = [ref.sequences[j, offset:offset + len(tokens)].tolist() for j in range(3)].index(tokens)  # its batch row
        want = [token_logprobs(step, ref.sequences[:, offset + t], [None] * j + [tops])[j]
                for t, step in enumerate(ref.logits)][:got[i].new_tokens]
        assert list(got[i].logprobs) == want
    # the recorder after a generate that ran one forward more than it kept tokens for (a deferred stop)
    rec = LogprobSteps([1])
    logits = torch.randn(1, 1, 5)
    out = type("Out", (), {"logits": logits})()
    for token in (None, 3, 4):
        rec.hook(None, (), {"input_ids": None if token is None else torch.tensor([[token]])}, out)
    assert [s[0].token for s in rec.finish(torch.tensor([[9, 3]]), 1)] == [3]


def test_continuous_batch_rows_ask_for_logprobs_alone():
    model = milp.tiny_model("llama")
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=2)
    batch.join("a", [5, 6, 7], max_new_tokens=2, logprobs=1)
    batch.join("b", [9, 4], max_new_tokens=2)
    updates = batch.step() + batch.step()
    assert {u.key for u in updates if u.logprob is not None} == {"a"}
    assert all(len(u.logprob.top) == 1 and u.logprob.token == u.tokens[-1] for u in updates if u.key == "a")
    with pytest.raises(ValueError, match=r"logprobs must be None \(no log-probabilities\) or an int in \[0, 20\]"):
        batch.join("c", [1], max_new_tokens=1, logprobs=21)


@pytest.mark.parametrize("bad, match", [
    (21, r"logprobs must be None \(no log-probabilities\) or an int in \[0, 20\]"),
    (-1, r"logprobs must be None"),
    (True, r"logprobs must be None"),
    ([1, 2], r"one per record, 3 in all"),
    ([1, 2, 30], r"logprobs\[2\] must be None"),
    ("2", r"logprobs must be None, an int in \[0, 20\], or a sequence of them"),
])
def test_bad_logprobs_are_named(tiny_chat_tokenizer, bad, match):
    model, rt, recs = _three_users(max_users=4)
    with pytest.raises(ValueError, match=match):
        generate_responses(model, tiny_chat_tokenizer, recs, runtime=rt, max_new_tokens=2, progress=False,
                           logprobs=bad)
