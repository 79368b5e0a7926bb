"""Stop strings under drawn texts: generated one token (character) at a time and stopped at the
first step whose text holds a stop string, every text a stream may hand on is the start of the
answer, and neither they nor the answer hold a stop string."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_stop_strings import _Chars, _ids  # tests/milp is on sys.path

from milp.detok import partial_text, stop_hit
from milp.pipeline import _answer_text

text = st.text(alphabet="ab c\n", max_size=30)


@settings(max_examples=300, deadline=None)
@given(full=text, stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=4), max_size=3))
def test_streamed_texts_are_starts_of_the_answer_and_hold_no_stop_string(full, stops):
    tok, ids = _Chars(), _ids(full)
    end = next((n for n in range(1, len(ids) + 1) if stop_hit(tok, ids[:n], stops)), len(ids))
    answer = _answer_text(tok, ids[:end], stops)  # the tokens generated until a stop string came
    assert not any(s in answer for s in stops)
    sent = ""
    for n in range(1, end + 1):
        partial = partial_text(tok, ids[:n], stops)
        assert answer.startswith(partial), (partial, answer)
        assert not any(s in partial for s in stops)
        if len(partial) > len(sent):  # what a stream hands on: texts that extend the last one
            assert partial.startswith(sent)
            sent = partial
    assert answer.startswith(sent)
