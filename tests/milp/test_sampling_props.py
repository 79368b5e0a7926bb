"""milp.sampling under drawn logits and settings: every row of a mixed call keeps the tokens
transformers' warpers keep (temperature, top-k, top-p, min-p in generate()'s order), a drawn
token is always a kept one, and a row's draws do not depend on the rows beside it."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sampling import hf_filtered  # tests/milp is on sys.path

from milp.sampling import Sampling, _filtered, pick_tokens, row_sampler

sampling = st.builds(
    Sampling,
    temperature=st.sampled_from([0.05, 0.3, 0.7, 1.0, 1.7, 5.0]),
    top_k=st.sampled_from([0, 0, 1, 2, 5, 40, 100]),
    top_p=st.sampled_from([1.0, 1.0, 0.1, 0.5, 0.9, 0.99]),
    min_p=st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**63 - 1),
)


@st.composite
def problems(draw):
    vocab = draw(st.integers(1, 64))
    rows = draw(st.integers(1, 5))
    # distinct logits: which of two equal tokens top-p drops depends on a sort's order, here and there
    values = draw(st.lists(st.lists(st.floats(-8, 8, width=32), min_size=vocab, max_size=vocab, unique=True),
                           min_size=rows, max_size=rows))
    return torch.tensor(values, dtype=torch.float32), draw(st.lists(st.one_of(st.none(), sampling),
                                                                    min_size=rows, max_size=rows))


@settings(max_examples=150, deadline=None)
@given(problem=problems(), steps=st.integers(1, 4))
def test_mixed_rows_sample_what_generate_keeps_each_alone(problem, steps):
    logits, settings_ = problem
    rows = [row_sampler(s) for s in settings_]
    sampled = [i for i, r in enumerate(rows) if r is not None]
    if sampled:
        got = _filtered(logits[sampled], [rows[i] for i in sampled])
        for j, i in enumerate(sampled):
            want = hf_filtered(logits[i:i + 1], settings_[i])[0]
            assert torch.equal(torch.isinf(got[j]), torch.isinf(want)), settings_[i]
    alone = [row_sampler(s) for s in settings_]
    for _ in range(steps):
        tokens = pick_tokens(logits, rows).tolist()
        for i, t in enumerate(tokens):
            if rows[i] is None:
                assert t == logits[i].argmax().item()
            else:
                assert torch.isfinite(hf_filtered(logits[i:i + 1], settings_[i])[0, t])  # a kept token
                assert pick_tokens(logits[i:i + 1], [alone[i]]).item() == t  # the same draw alone
