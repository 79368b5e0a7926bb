"""``python -m milp.answer``: a finished run's personalized model answers any of its users."""
from __future__ import annotations

import json

import pytest

import milp.answer as answer


@pytest.fixture(scope="session")
def run(answer_run):
    return answer_run  # conftest.py: one finished run for this file and its twin


def test_answers_equal_the_runs_own_predictions(run, tmp_path):
    """The test user's queries, asked through milp.answer (users loaded from the run's store into
    2 slots, mixed with other users' queries), get exactly the run's evaluation answers."""
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    others = json.loads((run / "split.json").read_text())["train"][:3]
    rows = [{"user_id": p["user_id"], "query": p["query"]} for p in preds]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "a.jsonl"
    assert answer.main([str(run), "--queries", str(queries), "--output", str(out), "--no-progress"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["answer"] for g in got] == [p["prediction"] for p in preds]
    assert [(g["user_id"], g["query"]) for g in got] == [(r["user_id"], r["query"]) for r in rows]
    # more users than the run's 2 slots in one call, swapped through the store: each answer is
    # the one that user gets alone
    asked = [(u, "What should I do?") for u in others] + [(rows[0]["user_id"], rows[0]["query"])]
    mixed = answer.answer(run, asked, batch_size=1, progress=False)
    assert mixed == [answer.answer(run, [q], batch_size=1, progress=False)[0] for q in asked]


def test_prints_answers_for_one_user(run, capsys):
    user = json.loads((run / "split.json").read_text())["test"][0]
    assert answer.main([str(run), "--user", user, "Is coffee fine?", "Should I rest?", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"[{user}]") == 2 and "Is coffee fine?" in printed and "\n-> " in printed


def test_bad_input_is_refused_by_name(run, tmp_path):
    with pytest.raises(SystemExit, match="unknown user 'nobody': the run holds 7 users"):
        answer.main([str(run), "--user", "nobody", "hi", "--no-progress"])
    with pytest.raises(SystemExit, match="is not a milp.train output directory"):
        answer.main([str(tmp_path), "--user", "u", "hi"])
    with pytest.raises(SystemExit, match="give --user USER and at least one QUERY"):
        answer.main([str(run), "--user", "u"])
    with pytest.raises(SystemExit, match="not both"):
        answer.main([str(run), "--user", "u", "hi", "--queries", "x.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u", "query": "q"}\n{"user_id": "u"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: needs non-empty string fields"):
        answer.main([str(run), "--queries", str(bad)])
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        answer.main([str(run), "--user", "u", "hi", "--max-new-tokens", "0"])


def test_more_distinct_users_than_slots_in_one_batch(run):
    """Regression: the run has 2 slots; 3 users' queries in one generation batch (the run's
    batch size) were refused by the runtime ("the batch names 3 distinct users but the runtime
    holds at most max_users=2 at once; split the batch"). Now answered 2 users at a time, in
    order, each as asked alone."""
    users = json.loads((run / "split.json").read_text())["train"][:3]
    asked = [(users[0], "Is coffee fine?"), (users[1], "What should I do?"), (users[2], "Should I rest?"),
             (users[0], "What should I do?")]
    assert answer.answer(run, asked, progress=False) == [
        answer.answer(run, [q], batch_size=1, progress=False)[0] for q in asked]


def test_blank_query_argument_is_refused_by_name(run):
    """Regression: a blank QUERY crashed in Record() with a traceback, after loading the model."""
    user = json.loads((run / "split.json").read_text())["test"][0]
    with pytest.raises(SystemExit, match="QUERY must be non-empty text"):
        answer.main([str(run), "--user", user, "  ", "--no-progress"])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        answer.answer(run, [(user, "hi")], max_new_tokens=0)


def test_streamed_answers_reach_their_queries_across_slot_windows(run):
    """``stream(i, text)`` names the query of the whole call (the run's 2 slots answer 3 users in
    two windows, whose records are numbered from 0 each): every query's texts grow to its answer."""
    users = json.loads((run / "split.json").read_text())["train"][:3]
    asked = [(users[0], "Is coffee fine?"), (users[1], "What should I do?"), (users[2], "Should I rest?"),
             (users[0], "What should I do?")]
    seen: dict[int, list[str]] = {}
    got = answer.answer(run, asked, progress=False, stream=lambda i, t: seen.setdefault(i, []).append(t))
    assert got == answer.answer(run, asked, progress=False)
    for i, a in enumerate(got):
        texts = seen.get(i, [])
        assert (texts[-1] if texts else "") == a
        assert all(b.startswith(x) for x, b in zip(texts, texts[1:]))


@pytest.mark.parametrize("max_new_tokens", ["1", "3"])
def test_one_printed_answer_comes_as_it_is_made_and_reads_as_before(run, capsys, monkeypatch, max_new_tokens):
    """One query printed: its answer is printed piece by piece while it is generated (no
    progress bar), and the output is the text a printed answer always was."""
    user = json.loads((run / "split.json").read_text())["test"][0]
    want = answer.answer(run, [(user, "Is coffee fine?")], max_new_tokens=int(max_new_tokens), progress=False)[0]
    writes: list[str] = []
    real = answer.answer

    def spy(*a, **k):
        assert k["progress"] is False and k["stream"] is not None
        return real(*a, **{**k, "stream": lambda i, t: (writes.append(t), k["stream"](i, t))})

    monkeypatch.setattr(answer, "answer", spy)
    assert answer.main([str(run), "--user", user, "Is coffee fine?", "--max-new-tokens", max_new_tokens]) == 0
    assert capsys.readouterr().out == f"[{user}] Is coffee fine?\n-> {want}\n\n"
    assert (writes[-1] if writes else "") == want


def test_the_output_file_holds_how_each_answer_ended_and_its_tokens_logprobs(run, tmp_path):
    user = json.loads((run / "split.json").read_text())["test"][0]
    want = answer.answer(run, [(user, "Is coffee fine?")], progress=False, logprobs=2)[0]
    out = tmp_path / "a.jsonl"
    assert answer.main([str(run), "--user", user, "Is coffee fine?", "--output", str(out), "--no-progress",
                        "--logprobs", "2"]) == 0
    row = json.loads(out.read_text())
    assert (row["answer"], row["finish_reason"], row["prompt_tokens"], row["new_tokens"]) == (
        str(want), want.finish_reason, want.prompt_tokens, want.new_tokens)
    assert [(e["token"], len(e["top"])) for e in row["logprobs"]] == [(e.token, 2) for e in want.logprobs]
    assert [e["logprob"] for e in row["logprobs"]] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
    for bad in (["--logprobs", "2"], ["--logprobs", "21", "--output", str(out)]):
        with pytest.raises(SystemExit, match=r"--logprobs must be an int in \[0, 20\] and comes with --output"):
            answer.main([str(run), "--user", user, "hi", "--no-progress", *bad])
