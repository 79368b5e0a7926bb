"""Stop strings: an answer ends once its text holds one, and is its text before the first one,
with static and continuous batching, in ``generate_responses``, ``milp.answer`` and
``milp.serve``; a stream never hands on a stop string, nor an end that may begin one."""
from __future__ import annotations

import json

import pytest
from test_pipeline import _three_users  # tests/milp is on sys.path
from test_serve import QUERIES, _post, _stream, _users

from milp import answer as answer_cli
from milp.answer import answer
from milp.detok import partial_text, stop_hit
from milp.pipeline import _answer_text, _stops_per_record, generate_responses
from milp.serve import AnswerServer


class _Chars:
    """A tokenizer whose token ids are characters."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("text, stops, answer, partial, hit", [
    ("Hello world", [], "Hello world", "Hello world", False),
    ("Hello world. Bye", [". "], "Hello world", "Hello world", True),
    ("Hello world.", [". "], "Hello world.", "Hello world", False),  # "." may begin ". ": held back
    ("Hello\n", ["\n\n"], "Hello", "Hello", False),
    ("Hi <st", ["<stop>"], "Hi <st", "Hi", False),
    ("Hi <stop> there <end>", ["<end>", "<stop>"], "Hi", "Hi", True),  # the first of them in the text
    ("  <stop>", ["<stop>"], "", "", True),
    ("ab", ["b", "abc"], "a", "a", True),
])
def test_an_answer_is_its_text_before_the_first_stop_string(text, stops, answer, partial, hit):
    tok = _Chars()
    assert _answer_text(tok, _ids(text), stops) == answer
    assert partial_text(tok, _ids(text), stops) == partial
    assert stop_hit(tok, _ids(text), stops) is hit


def test_stop_strings_are_given_for_all_records_or_one_per_record():
    assert _stops_per_record(None, 2) == [(), ()]
    assert _stops_per_record(["x", "y"], 3) == [("x", "y")] * 3
    assert _stops_per_record([["x"], None], 2) == [("x",), ()]
    for bad, match in ((["x", ""], "stop_strings must be a sequence of non-empty strings"),
                       ("x", "stop_strings must be a sequence of strings"),
                       ([["x"]], r"one sequence of them \(or None\) per record, 2 in all"),
                       ([["x"], "y"], r"stop_strings\[1\] must be a sequence of non-empty strings")):
        with pytest.raises(ValueError, match=match):
            _stops_per_record(bad, 2)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_answers_end_at_their_stop_strings(tiny_chat_tokenizer, batching):
    tok = tiny_chat_tokenizer
    model, rt, recs = _three_users(max_users=4)
    kw = dict(runtime=rt, max_new_tokens=16, batch_size=3, progress=False)
    free = generate_responses(model, tok, recs, **kw)
    stop0 = free[0][len(free[0]) // 2:len(free[0]) // 2 + 2]  # two characters from the middle of answer 0
    stops = [[stop0], None, ["\x00never"]]
    assert stop0.strip() and stop0 in free[0], free

    def want(a, ss):
        at = min((a.find(s) for s in ss or [] if s in a), default=-1)
        return a[:at].strip() if at >= 0 else a

    streamed: dict[int, list[str]] = {}
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = generate_responses(model, tok, recs, stop_strings=stops, batching=batching,
                                 stream=lambda i, t: streamed.setdefault(i, []).append(t), **kw)
    finally:
        handle.remove()
    assert got == [want(a, s) for a, s in zip(free, stops)]
    assert len(got[0]) < len(free[0])
    assert all(texts[-1] == got[i] for i, texts in streamed.items())
    assert not any(stop0 in t for t in streamed[0])  # held back, then cut
    # every row stopped: a stop string for all that ends each answer early ends the generation early
    firsts = sorted({a[len(a) // 2] for a in free if a})
    calls.clear()
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        ended = generate_responses(model, tok, recs, stop_strings=firsts, batching=batching, **kw)
    finally:
        handle.remove()
    assert ended == [want(a, firsts) for a in free] and len(calls) < 16


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_server_and_the_command_end_answers_at_stop_strings(answer_run, tmp_path, capsys, batching):
    user = _users(answer_run)[0]
    free = answer(answer_run, [(user, QUERIES[0])], progress=False)[0]
    stop = free[len(free) // 2:len(free) // 2 + 2]
    want = answer(answer_run, [(user, QUERIES[0])], progress=False, stop_strings=[stop], batching=batching)[0]
    assert want == free[:free.find(stop)].strip() and len(want) < len(free)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching=batching) as server:
        assert _post(server, {"user_id": user, "query": QUERIES[0], "stop": stop})[1]["answer"] == want
        assert _post(server, {"user_id": user, "query": QUERIES[0], "stop": ["\x00", stop]})[1]["answer"] == want
        status, _, events = _stream(server, {"user_id": user, "query": QUERIES[0], "stop": [stop]})
        assert status == 200 and events[-1]["answer"] == want
        assert "".join(e["delta"] for e in events[:-1]) == want
        for bad in ("", [], ["a", ""], ["a"] * 5, 3):
            code, out = _post(server, {"user_id": user, "query": QUERIES[0], "stop": bad})
            assert code == 400 and "'stop' must be a non-empty string or a list of 1 to 4 of them" in out["error"]
    out = tmp_path / "a.jsonl"
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"user_id": user, "query": QUERIES[0]}) + "\n")
    assert answer_cli.main([str(answer_run), "--queries", str(queries), "--output", str(out), "--no-progress",
                            "--stop", stop, "--batching", batching]) == 0
    assert json.loads(out.read_text())["answer"] == want
    with pytest.raises(SystemExit, match="--stop must be a non-empty text"):
        answer_cli.main([str(answer_run), "--user", user, "hi", "--stop", ""])


class _CountingTokenizer:
    """A tokenizer that counts the tokens it decodes (everything else is the wrapped one's)."""

    def __init__(self, tok):
        self._tok, self.decoded = tok, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __len__(self):
        return len(self._tok)

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self._tok.decode(ids, **kwargs)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_streamed_answers_with_stop_strings_decode_only_what_is_new(tiny_chat_tokenizer, batching):
    """A stream and stop strings read every row's text after every token: the tokens decoded
    per answer token do not grow with the answer (milp.detok.AnswerText; a whole decode per step
    would make them grow as the answer does), and the answers are the same."""
    model, rt, recs = _three_users(max_users=4)
    per_token = []
    for n in (32, 128):
        kw = dict(runtime=rt, max_new_tokens=n, batch_size=3, progress=False, batching=batching,
                  stop_strings=["\x00never"])
        want = generate_responses(model, tiny_chat_tokenizer, recs, **kw)
        tok = _CountingTokenizer(tiny_chat_tokenizer)
        streamed: dict[int, list[str]] = {}
        got = generate_responses(model, tok, recs, stream=lambda i, t, seen=streamed: seen.setdefault(i, []).append(t),
                                 **kw)
        assert got == want and all(streamed[i][-1] == a for i, a in enumerate(got) if a)
        tokens = sum(a.new_tokens for a in got)
        assert tokens >= 2 * n, [a.new_tokens for a in got]  # two rows run to the end
        per_token.append(tok.decoded / tokens)
    # (decoding the whole answer at every step: 16 and 63 tokens per answer token)
    assert per_token[1] < 1.5 * per_token[0], per_token
