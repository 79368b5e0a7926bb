"""Property tests of ``python -m milp.answer``: drawn query lists (users with repeats, in any
order, more distinct users than the run's slots) get, in order, the answer each (user, query)
gets alone; the CLI's bad input is refused by name before the model is loaded."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import milp.answer as answer

SLOTS = 2
QUESTIONS = ["What should I do?", "Is coffee fine?", "My knee hurts when I run.", "Should I rest?"]


@pytest.fixture(scope="session")
def run(answer_run):
    return answer_run  # conftest.py: one finished run for this file and its twin


@pytest.fixture(scope="module")
def users(run):
    split = json.loads((run / "split.json").read_text())
    return sorted(split["train"] + split["val"] + split["test"])


@pytest.fixture(scope="module")
def alone(run):
    """``(user, query) -> answer`` asked alone (one query per call), memoized."""
    cache: dict = {}

    def get(q):
        if q not in cache:
            cache[q] = answer.answer(run, [q], batch_size=1, progress=False)[0]
        return cache[q]

    return get


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(data=st.data(), batch_size=st.sampled_from([1, 2, 3, 8, None]))
def test_any_mix_of_users_gets_each_answer_alone(run, users, alone, data, batch_size):
    """Any number of distinct users in one call and in one batch (the run has 2 slots; users
    are swapped through the store): the answers come back in order, each the one its (user,
    query) gets alone. Before, a batch naming more distinct users than the run's slots was
    refused by the runtime ("split the batch") — with the run's default batch size, every
    --queries file with 3 users in its first 8 rows."""
    k = data.draw(st.integers(SLOTS + 1, min(5, len(users))))
    chosen = data.draw(st.lists(st.sampled_from(users), min_size=k, max_size=k, unique=True))
    queries = data.draw(st.lists(st.tuples(st.sampled_from(chosen), st.sampled_from(QUESTIONS)),
                                 min_size=k, max_size=k + 3))
    got = answer.answer(run, queries, batch_size=batch_size, progress=False)
    assert got == [alone(q) for q in queries]


def test_the_cli_answers_more_users_than_slots_in_one_file(run, users, alone, tmp_path):
    queries = [(u, QUESTIONS[i % len(QUESTIONS)]) for i, u in enumerate(users[: SLOTS + 2])]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"user_id": u, "query": q}) + "\n" for u, q in queries))
    out = tmp_path / "sub" / "a.jsonl"
    assert answer.main([str(run), "--queries", str(f), "--output", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["user_id"], r["query"]) for r in rows] == queries
    assert [r["answer"] for r in rows] == [alone(q) for q in queries]


def _no_model(monkeypatch):
    """Loading the model fails the test: bad input must be refused before it."""
    import milp.models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(milp.models, "load_model", boom)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_counts_are_refused_by_name(run, users, monkeypatch, bad):
    """``answer(max_new_tokens=0)`` used to answer with the run's length, silently (``0 or
    default``); a float or a bool went on into generate."""
    _no_model(monkeypatch)
    q = [(users[0], "hi")]
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        answer.answer(run, q, max_new_tokens=bad, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        answer.answer(run, q, batch_size=bad, progress=False)


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_queries_are_refused_by_name(run, users, monkeypatch, query):
    """A blank QUERY argument (or query) used to crash in Record() after the model was loaded."""
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match="QUERY must be non-empty text"):
        answer.main([str(run), "--user", users[0], "fine question", query, "--no-progress"])
    with pytest.raises(ValueError, match=r"queries\[1\] must be a \(user_id, query\) pair of non-empty strings"):
        answer.answer(run, [(users[0], "fine"), (users[0], query)], progress=False)


@pytest.mark.parametrize("item", [("u",), "uq", ("u", "q", "x"), (None, "q"), ("u", 3), ["u", "q"]])
def test_malformed_query_pairs_are_refused_by_name(run, users, monkeypatch, item):
    _no_model(monkeypatch)
    if item == ["u", "q"]:  # a list pair is a pair
        item = [users[0], ""]
    with pytest.raises(ValueError, match=r"queries\[0\] must be a \(user_id, query\) pair of non-empty strings"):
        answer.answer(run, [item], progress=False)
    with pytest.raises(ValueError, match="queries must be a sequence of"):
        answer.answer(run, item if isinstance(item, str) else iter([item]), progress=False)


def test_no_queries_answer_nothing(run, monkeypatch):
    _no_model(monkeypatch)
    assert answer.answer(run, [], progress=False) == []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(
    st.fixed_dictionaries({"user_id": st.sampled_from(["u1", "meddia-d2-0001", " ", "a b"]) | st.text(max_size=5),
                           "query": st.sampled_from(["Why?", " ", "\t\n", "x"]) | st.text(max_size=8)}),
    st.fixed_dictionaries({"user_id": st.one_of(st.integers(), st.none(), st.just("")),
                           "query": st.text(max_size=3)}),
    st.lists(st.integers(), max_size=2),
), min_size=1, max_size=5), blank_lines=st.booleans())
def test_read_queries_keeps_exactly_the_good_rows_or_names_the_first_bad_line(tmp_path_factory, rows, blank_lines):
    """``--queries`` files: all rows good -> their (user_id, query) pairs in order; else the
    first bad line is named by its number (blank lines count as lines and are skipped)."""
    f = tmp_path_factory.mktemp("q") / "q.jsonl"
    lines = []
    for r in rows:
        if blank_lines:
            lines.append("")
        lines.append(json.dumps(r))
    f.write_text("\n".join(lines) + "\n")

    def good(r):
        return (isinstance(r, dict) and isinstance(r["user_id"], str) and r["user_id"].strip()
                and isinstance(r["query"], str) and bool(r["query"].strip()))

    bad = [i for i, r in enumerate(rows) if not good(r)]
    if not bad:
        assert answer._read_queries(str(f)) == [(r["user_id"], r["query"]) for r in rows]
    else:
        line = 2 * bad[0] + 2 if blank_lines else bad[0] + 1
        with pytest.raises(SystemExit, match=rf"q.jsonl:{line}: needs non-empty string fields"):
            answer._read_queries(str(f))


@pytest.mark.parametrize("content", [b"\xff\xfe{}", '{"user_id": "\xe9", "query": "q"}\n'.encode("latin-1")])
def test_a_queries_file_that_is_not_utf8_is_refused_by_name(tmp_path, content):
    """Regression: a UnicodeDecodeError traceback (only OSError was caught)."""
    f = tmp_path / "q.jsonl"
    f.write_bytes(content)
    with pytest.raises(SystemExit, match=r"--queries: '.*q.jsonl' is not UTF-8 text"):
        answer._read_queries(str(f))
    with pytest.raises(SystemExit, match="cannot read"):
        answer._read_queries(str(tmp_path))
