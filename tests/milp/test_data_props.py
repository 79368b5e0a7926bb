"""Property tests of milp.data on drawn users and files: split_users with the default 70/10/20 is a
partition of the users (each exactly once, whole users, every record kept once, sizes within
rounding, the same for any record order and seed-reproducible); read_jsonl reads any records back
whatever the file's dressing (byte-order mark, CRLF, blank lines, extra keys, escaped or raw
Unicode); text that is not Unicode (a lone surrogate, which JSON escapes can make) is a malformed
line named by file:line in every loader and refused by Record and write_jsonl, never a crash on
writing or tokenizing; user_memories keeps a user's first non-blank profile; LaMP user ids are
the field's value (0 included) and gold ids match question ids as the questions' are read; a
NaN time does not scramble AmazonQA's order; a blank Reddit author is a malformed line; MedDia
files whose tags coincide still give one user id per dialogue; broken JSON in a MedDia or profiles
file is reported as file:line."""
from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milp.data import (
    DataFormatError,
    Record,
    load_amazonqa,
    load_lamp,
    load_meddia,
    load_meddia_profiles,
    load_reddit,
    meddia_dir,
    read_jsonl,
    split_users,
    user_memories,
    write_jsonl,
)

SETTINGS = settings(max_examples=40, deadline=None)

_word = st.sampled_from(["knee", "tea", "run", "é", "日本", "😀", "a\u2028b", "x\ty", '"q"', "\\", "ok?"])
_text = st.lists(_word, min_size=1, max_size=4).map(" ".join)
_records = st.builds(Record, user_id=_text, profile=st.one_of(st.just(""), st.just("  "), _text),
                     history=st.lists(_text, min_size=1, max_size=3), query=_text, response=_text)


def _load(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught]


# --------------------------------------------------------------------------- split_users
@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 30), seed=st.integers(0, 2**32))
def test_default_split_is_a_partition_of_the_users(data, n, seed):
    records = []
    for i in range(n):
        r = Record(f"user {i}", "", [f"h{i}"], f"q{i}?", "r")
        records += [r] * data.draw(st.integers(1, 3))  # a user's records, duplicates included
    records = data.draw(st.permutations(records))
    parts = split_users(records, seed=seed)
    assert len(parts) == 3
    users = [{r.user_id for r in p} for p in parts]
    assert sum(map(len, users)) == len(set().union(*users)) == n  # each user in exactly one split
    assert Counter(r for p in parts for r in p) == Counter(records)  # every record exactly once
    for want, got in zip((0.7, 0.1, 0.2), users):
        if n >= 10:  # every quota >= 1: largest-remainder rounding
            assert math.floor(want * n + 1e-9) <= len(got) <= math.ceil(want * n - 1e-9)
        elif n >= 3:  # each split gets a user when there are enough
            assert got
    assert split_users(records, seed=seed) == parts
    again = split_users(data.draw(st.permutations(records)), seed=seed)
    assert [{r.user_id for r in p} for p in again] == users


# --------------------------------------------------------------------------- JSONL
@SETTINGS
@given(records=st.lists(_records, max_size=5), data=st.data())
def test_read_jsonl_reads_any_dressing_of_the_records(records, data):
    lines = []
    for r in records:
        obj = {**r.to_dict(), **data.draw(st.dictionaries(st.sampled_from(["extra", "id", "meta"]), _text))}
        lines += [""] * data.draw(st.integers(0, 2)) + [json.dumps(obj, ensure_ascii=data.draw(st.booleans()))]
    newline = data.draw(st.sampled_from(["\n", "\r\n", "\r"]))
    raw = (newline.join(lines) + newline * data.draw(st.integers(0, 2))).encode("utf-8")
    if data.draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_bytes(raw)
        assert read_jsonl(path) == records
        write_jsonl(records, Path(d) / "out.jsonl")
        assert read_jsonl(Path(d) / "out.jsonl") == records


_SURROGATES = st.sampled_from(["\ud83d", "\ude00", "\udfff", "\ud800"])


@SETTINGS
@given(records=st.lists(_records, min_size=1, max_size=4), data=st.data())
def test_text_that_is_not_unicode_is_a_malformed_line(records, data):
    """A lone surrogate (``"\\ud83d"`` cut from an emoji's pair) cannot be written as UTF-8 nor
    tokenized: it is refused where the text comes in, naming the field (and the file's line)."""
    k = data.draw(st.integers(0, len(records) - 1))
    field = data.draw(st.sampled_from(["user_id", "profile", "history", "query", "response"]))
    obj = records[k].to_dict()
    s = data.draw(_SURROGATES)
    if field == "history":
        obj["history"][-1] += s
        name = f"field 'history' item {len(obj['history']) - 1}"
    else:
        obj[field] = s + obj[field]
        name = f"field {field!r}"
    with pytest.raises(ValueError, match=f"{name} is not valid Unicode text"):
        Record.from_dict(obj)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        lines = [json.dumps(obj if i == k else r.to_dict()) for i, r in enumerate(records)]  # ASCII escapes
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:{k + 1}: {name} is not valid Unicode"):
            read_jsonl(path)
        out, msgs = _load(read_jsonl, path, on_error="skip")
        assert out == records[:k] + records[k + 1:] and f"{path}:{k + 1}: " in msgs[0]
        target = Path(d) / "out.jsonl"
        with pytest.raises(ValueError, match=rf"records\[{k}\]: {name}"):
            write_jsonl([obj if i == k else r for i, r in enumerate(records)], target)
        assert not target.exists()


_LOADER_LINES = {
    "amazonqa": (load_amazonqa, [{"user_id": "A", "question": "Does it fit?", "answer": "Yes.", "reviews": ["Nice."]},
                                 {"user_id": "B", "question": "Is it loud?", "answer": "No.", "reviews": "Quiet."}],
                 ["user_id", "question", "answer", "reviews", "profile"]),
    "reddit": (load_reddit, [{"author": "al", "body": "I run.", "subreddit": "run"},
                             {"author": "al", "body": "Ice it.", "parent_body": "Knee?"}],
               ["author", "body", "parent_body", "profile", "subreddit"]),
    "lamp": (load_lamp, [{"id": "1", "input": "Title?", "profile": [{"text": "my text"}], "output": "T"},
                         {"id": "2", "input": "Tag?", "profile": ["item"], "output": "x", "user_id": "u"}],
             ["id", "input", "output", "user_id"]),
}


@pytest.mark.parametrize("fmt", sorted(_LOADER_LINES))
@SETTINGS
@given(data=st.data())
def test_other_loaders_name_the_line_of_text_that_is_not_unicode(fmt, data):
    loader, objs, fields = _LOADER_LINES[fmt]
    k = data.draw(st.integers(0, len(objs) - 1))
    field = data.draw(st.sampled_from(fields))
    bad = [dict(o) for o in objs]
    bad[k][field] = "text " + data.draw(_SURROGATES)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_text("".join(json.dumps(o) + "\n" for o in bad), encoding="utf-8")
        with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:{k + 1}: .*not valid Unicode text"):
            loader(path)


# --------------------------------------------------------------------------- user_memories
@SETTINGS
@given(records=st.lists(_records, min_size=1, max_size=6), data=st.data())
def test_user_memories_keep_the_first_non_blank_profile(records, data):
    users = data.draw(st.lists(st.sampled_from(["a", "b"]), min_size=len(records), max_size=len(records)))
    records = [Record(u, r.profile, r.history, r.query, r.response) for u, r in zip(users, records)]
    mems = {m.user_id: m for m in user_memories(records)}
    assert list(mems) == list(dict.fromkeys(users))
    for u, m in mems.items():
        mine = [r for r in records if r.user_id == u]
        assert m.profile == next((r.profile for r in mine if r.profile.strip()), "")
        assert m.history == tuple(dict.fromkeys(h for r in mine for h in r.history))


def test_user_memories_regression_blank_profile_first():
    rs = [Record("a", "  ", ["x"], "q1", "r"), Record("a", "likes tea", ["y"], "q2", "r")]
    assert user_memories(rs)[0].profile == "likes tea"  # was "  ": the user's profile was lost


# --------------------------------------------------------------------------- LaMP ids
_ids = st.one_of(st.integers(-3, 3), st.sampled_from(["0", "7", " 7", "7 ", "u-1", "日本"]))


@SETTINGS
@given(data=st.data(), n=st.integers(1, 5))
def test_lamp_user_and_gold_ids_are_read_as_text(data, n):
    """user_id = the field as text (0 and "0" too), else lamp-<id>; a gold matches its question
    whatever the id's form (number, padded string)."""
    questions, golds, want = [], [], []
    for i in range(n):
        qid = data.draw(st.sampled_from([i, str(i), f" {i}", f"{i} "]))
        q = {"id": qid, "input": f"input {i}", "profile": [{"text": f"h{i}"}]}
        user = data.draw(st.one_of(st.none(), st.just(""), _ids))
        if user is not None:
            q["user_id"] = user
        golds.append({"id": data.draw(st.sampled_from([i, str(i), f" {i} "])), "output": f"out {i}"})
        questions.append(q)
        name = str(user).strip() if user not in (None, "") else f"lamp-{str(qid).strip()}"
        want.append(Record(name, "", [f"h{i}"], f"input {i}", f"out {i}"))
    with tempfile.TemporaryDirectory() as d:
        qpath, gpath = Path(d) / "q.jsonl", Path(d) / "g.json"
        qpath.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
        gpath.write_text(json.dumps({"task": "LaMP", "golds": data.draw(st.permutations(golds))}), encoding="utf-8")
        assert load_lamp(qpath, gpath) == want


# --------------------------------------------------------------------------- AmazonQA order
_times = st.one_of(st.integers(-5, 5), st.floats(-5, 5), st.just(math.nan), st.sampled_from(["nan", "NaN", "2.5"]))


@SETTINGS
@given(times=st.lists(_times, min_size=1, max_size=6), examples_per_user=st.integers(1, 3))
def test_amazonqa_orders_by_time_with_nan_as_no_time(times, examples_per_user):
    """A NaN time (JSON's NaN, or "nan") is no usable time: the question sorts as an untimed one
    (time 0, file order), and the rest keep their time order."""
    rows = [{"user_id": "A", "question": f"q{i}", "answer": "a", "reviews": ["r"], "time": t}
            for i, t in enumerate(times)]

    def key(i):
        t = float(times[i])
        return (0.0 if math.isnan(t) else t, i)

    order = [rows[i]["question"] for i in sorted(range(len(rows)), key=key)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "qa.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # NaN as JSON's NaN
        out = load_amazonqa(path, examples_per_user=examples_per_user)
    assert [r.query for r in out] == order[-examples_per_user:]
    for r in out:
        k = order.index(r.query)
        assert r.history == ("r", *order[:k])


# --------------------------------------------------------------------------- Reddit authors
@SETTINGS
@given(data=st.data(), n=st.integers(1, 5))
def test_reddit_blank_author_is_a_malformed_line(data, n):
    rows = [{"author": "al", "body": f"comment {i}", "parent_body": f"post {i}"} for i in range(n)]
    k = data.draw(st.integers(0, n))
    blank = data.draw(st.sampled_from([" ", "  ", "\t", "\n"]))
    lines = [json.dumps(r) for r in rows]
    lines.insert(k, json.dumps({"author": blank, "body": "who?", "parent_body": "post"}))
    with tempfile.TemporaryDirectory() as d:
        path, clean = Path(d) / "in.jsonl", Path(d) / "clean.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        clean.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:{k + 1}: author must be non-empty"):
            load_reddit(path)
        out, msgs = _load(load_reddit, path, on_error="skip", examples_per_user=n)
        assert out == _load(load_reddit, clean, examples_per_user=n)[0]
        assert "skipped 1 malformed line(s)" in msgs[0]


# --------------------------------------------------------------------------- MedDia files
@pytest.fixture(scope="module")
def dialogues():
    return json.loads((meddia_dir() / "dialogues2_cleaned.json").read_text(encoding="utf-8"))[:12]


_NAMES = ["dialogues_1.json", "dialogues_1_more.json", "dialogue1b.json", "dialogues_2.json",
          "dialogues_extra.json", "dialogues_extra_x.json", "dialogues.json", "dialogue_x1_2.json"]


@settings(max_examples=25, deadline=None)
@given(names=st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4, unique=True), data=st.data())
def test_meddia_files_with_the_same_tag_keep_one_user_per_dialogue(dialogues, names, data):
    with tempfile.TemporaryDirectory() as d:
        per_file = {}
        for name in names:
            chunk = data.draw(st.lists(st.sampled_from(dialogues), min_size=1, max_size=3))
            (Path(d) / name).write_text(json.dumps(chunk), encoding="utf-8")
            per_file[name] = load_meddia(Path(d) / name)
        out = load_meddia(d)
    assert len({r.user_id for r in out}) == len(out)  # one example per user: ids never shared
    expected = [r for name in sorted(names) for r in per_file[name]]
    assert [r.to_dict() | {"user_id": ""} for r in out] == [r.to_dict() | {"user_id": ""} for r in expected]
    tags = [r.user_id.rsplit("-", 1)[0] for r in out]
    first = sorted(names)[0]  # the first file keeps its plain tag
    assert [r.user_id for r in out[:len(per_file[first])]] == [r.user_id for r in per_file[first]]
    assert len(set(tags)) == sum(1 for name in names if per_file[name])


_DOCS = {}


def _documents():
    """A few shipped dialogues and profile strings (read once)."""
    if not _DOCS:
        for which, name in (("dialogues", "dialogues2_cleaned.json"), ("profiles", "profiles_4.json")):
            _DOCS[which] = json.loads((meddia_dir() / name).read_text(encoding="utf-8"))[:3]
    return _DOCS


@SETTINGS
@given(cut=st.integers(1, 400), which=st.sampled_from(["dialogues", "profiles"]))
def test_broken_json_documents_are_reported_at_their_line(cut, which):
    text = json.dumps(_documents()[which], indent=1)
    broken = text[:len(text) * cut // 401]
    try:
        json.loads(broken)
    except json.JSONDecodeError as exc:
        line = exc.lineno
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{which}9.json"
        path.write_text(broken, encoding="utf-8")
        loader = load_meddia if which == "dialogues" else load_meddia_profiles
        with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:{line}: invalid JSON"):
            loader(path)


@pytest.mark.parametrize("arg", ["examples_per_user", "min_query_words", "min_response_words", "max_users"])
def test_load_meddia_refuses_a_bool_for_a_count(arg):
    with pytest.raises(ValueError, match=f"{arg} must be a positive int.*got True"):
        load_meddia(**{arg: True})


def test_reddit_blank_subreddit_is_no_subreddit(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in [
        {"author": "al", "body": "I run.", "subreddit": "  "},
        {"author": "al", "body": "Ice it.", "parent_body": "Knee?"}]), encoding="utf-8")
    assert load_reddit(path)[0].profile == ""  # was "Posts in r/  "
