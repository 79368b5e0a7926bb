"""milp.data: schema, JSONL I/O, loaders, the user split, tokenization and collation."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from milp.data import (
    IGNORE_INDEX,
    Collator,
    DataFormatError,
    Record,
    UserMemory,
    clean_utterance,
    collate,
    format_memory,
    format_prompt,
    group_by_user,
    load_amazonqa,
    load_lamp,
    load_meddia,
    load_meddia_profiles,
    load_reddit,
    meddia_dir,
    read_jsonl,
    record_keys,
    split_users,
    tokenize_instruction,
    tokenize_memory,
    user_memories,
    write_jsonl,
)


def rec(uid="u1", history=("I run every day.",), query="Why does my knee hurt?", response="Rest it.", profile=""):
    return Record(uid, profile, list(history), query, response)


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


# --------------------------------------------------------------------------- schema
def test_record_validation_and_round_trip():
    r = rec(history=["a", "b"])
    assert r.history == ("a", "b")
    assert Record.from_dict(r.to_dict()) == r
    assert rec(profile="").profile == ""
    with pytest.raises(ValueError, match="'history' is empty"):
        rec(history=[])
    with pytest.raises(ValueError, match="'history' item 1 is empty"):
        rec(history=["ok", "  "])
    with pytest.raises(TypeError, match="'history' must be a list of strings"):
        Record("u", "", "not a list", "q", "r")
    with pytest.raises(TypeError, match="'history' item 0 must be a string"):
        Record("u", "", [3], "q", "r")
    with pytest.raises(ValueError, match="'user_id' is empty"):
        rec(uid=" ")
    with pytest.raises(ValueError, match="'query' is empty"):
        rec(query="")
    with pytest.raises(TypeError, match="'response' must be a string"):
        Record("u", "", ["h"], "q", None)
    with pytest.raises(ValueError, match=r"missing field\(s\) 'profile', 'query'"):
        Record.from_dict({"user_id": "u", "history": ["h"], "response": "r"})
    with pytest.raises(TypeError, match="JSON object"):
        Record.from_dict(["u"])


def test_jsonl_round_trip_and_errors(tmp_path):
    records = [rec("u1"), rec("u2", history=["x", "y"], profile="p")]
    path = write_jsonl(records, tmp_path / "sub" / "data.jsonl")
    assert read_jsonl(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]  # no temp file left

    good = records[0].to_dict()
    bad = write_lines(tmp_path / "bad.jsonl", [
        good, "", "{not json", {**good, "history": []}, {k: v for k, v in good.items() if k != "query"}, good,
    ])
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:3: invalid JSON")) as info:
        read_jsonl(bad)
    assert info.value.line == 3
    with pytest.warns(UserWarning, match=r"skipped 3 malformed line\(s\)") as rec_w:
        out = read_jsonl(bad, on_error="skip")
    assert len(out) == 2
    msg = str(rec_w[0].message)
    assert f"{bad}:4: field 'history' is empty" in msg and f"{bad}:5: missing field(s) 'query'" in msg
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        read_jsonl(bad, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_write_jsonl_is_atomic(tmp_path):
    path = write_jsonl([rec("old")], tmp_path / "d.jsonl")
    before = path.read_text()
    with pytest.raises(ValueError, match=r"records\[1\]: field 'history' is empty"):
        write_jsonl([rec("new").to_dict(), {**rec().to_dict(), "history": []}], path)
    with pytest.raises(TypeError, match=r"records\[0\] must be a Record or a dict"):
        write_jsonl([42], path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# --------------------------------------------------------------------------- MedDia
def test_clean_utterance():
    assert clean_utterance('"I have a cough."') == ("I have a cough.", None)
    assert clean_utterance('Patient: "My chest hurts."') == ("My chest hurts.", "patient")
    assert clean_utterance("Doctor: I see.  Any  fever?") == ("I see. Any fever?", "doctor")
    assert clean_utterance("Dr. Smith: Take rest.") == ("Take rest.", "doctor")
    assert clean_utterance('You: "It has been 2 days."') == ("It has been 2 days.", None)
    assert clean_utterance("John: Thanks.", names={"John"}) == ("Thanks.", None)
    assert clean_utterance("Note: keep this") == ("Note: keep this", None)  # not a speaker label
    assert clean_utterance("Okay, thanks.\n\nDoctor: You're welcome.") == ("Okay, thanks.", None)
    assert clean_utterance("") == ("", None)
    with pytest.raises(TypeError, match="text must be a string"):
        clean_utterance(None)


def _turns(*pairs):
    return [{str(i): {"Assistant": a, "User": u}} for i, (a, u) in enumerate(pairs)]


def test_meddia_conversion_rule(tmp_path):
    dialogues = [
        _turns(  # normal dialogue: two candidate exchanges
            ("Doctor: Hello, how can I help?", '"I have had a bad headache for three days now."'),
            ("Doctor: Have you taken anything for it so far?", "Patient: Only ibuprofen, which did not help much."),
            ("Doctor: Drink water, sleep well, and see a doctor if it gets worse over the week.",
             "Patient: Should I get a brain scan for this headache?"),
            ("Doctor: A scan is not needed unless you have other warning signs such as vision loss.", "Thanks!"),
        ),
        _turns(  # fields swap roles after an empty patient turn
            ("Hello, what brings you here?", "My ankle is swollen after a fall yesterday."),
            ("Can you put weight on the ankle at all when you stand up?", ""),
            ("Yes but it hurts a lot when I walk. What should I do about it?",
             "Rest, ice, compression and elevation for two days, then see a clinician if it does not improve."),
        ),
        _turns(("Doctor: Hi.", "End of simulation."), ("Goodbye!", "Goodbye!")),  # no usable example
    ]
    path = tmp_path / "dialogues7_x.json"
    path.write_text(json.dumps(dialogues))
    out = load_meddia(path)
    assert [r.user_id for r in out] == ["meddia-d7-0000", "meddia-d7-0001"]
    a, b = out
    assert a.query == "Should I get a brain scan for this headache?"
    assert a.response.startswith("A scan is not needed")
    assert a.history == ("I have had a bad headache for three days now.", "Only ibuprofen, which did not help much.")
    assert a.profile == "I have had a bad headache for three days now."
    assert b.history == ("My ankle is swollen after a fall yesterday.",)
    assert b.query == "Yes but it hurts a lot when I walk. What should I do about it?"
    assert b.response.startswith("Rest, ice")
    every = load_meddia(path, examples_per_user=None, profile="none")
    assert [r.query for r in every if r.user_id == a.user_id] == [
        "Only ibuprofen, which did not help much.", "Should I get a brain scan for this headache?"]
    assert every[0].history == (a.history[0],) and all(r.profile == "" for r in every)
    assert load_meddia(path) == out  # deterministic
    with pytest.raises(ValueError, match="examples_per_user must be a positive int"):
        load_meddia(path, examples_per_user=0)
    with pytest.raises(ValueError, match="profile must be 'summary' or 'none'"):
        load_meddia(path, profile="pool")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_meddia(tmp_path / "nope")


@pytest.fixture(scope="module")
def shipped():
    return load_meddia()


def test_shipped_meddia(shipped):
    for name in ("LICENSE", "README.md", "dialogues2_cleaned.json", "dialogues_3_cleaned.json", "profiles_4.json"):
        assert (meddia_dir() / name).is_file()
    users = {r.user_id for r in shipped}
    assert len(users) == len(shipped) and 600 < len(users) <= 704
    speaker = re.compile(r"^(Patient|Doctor|Assistant|User)\s*:")
    for r in shipped:
        for text in (*r.history, r.query, r.response, r.profile):
            assert not speaker.match(text), text
            assert not text.startswith('"') and not text.endswith('"'), text
        assert r.profile and r.history[0].startswith(r.profile.split()[0])
        assert len(r.query.split()) >= 4 and len(r.response.split()) >= 8
    assert sum("?" in r.query for r in shipped) > 0.8 * len(shipped)


def test_meddia_profiles(tmp_path):
    with pytest.warns(UserWarning, match="skipped 187 malformed"):
        profiles = load_meddia_profiles()
    assert len(profiles) == 3283 - 187  # 186 invalid JSON strings, one JSON non-object
    assert {"personal_information", "symptoms", "dialogue_preference"} <= set(profiles[0])
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([json.dumps({"symptoms": "cough"}), "{oops"]))
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:item 1: invalid JSON string")):
        load_meddia_profiles(bad, on_error="raise")


# --------------------------------------------------------------------------- user-supplied formats
def test_load_amazonqa(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [
        {"reviewerID": "A", "questionText": "Does it fit a 15 inch laptop?",
         "answers": [{"answerText": "Yes, it does."}], "reviews": ["Great bag, sturdy straps."], "unixTime": 20},
        {"user_id": "A", "question": "Is the strap padded?", "answer": "Yes, lightly.", "unixTime": 10},
        {"user_id": "B", "question": "Waterproof?", "answer": "No."},  # no history -> left out
        {"userID": "C", "question": "Battery life?", "answers": ["About 10 hours.", "ignored"],
         "review_snippets": "Works well on trips."},
    ])
    with pytest.warns(UserWarning, match=r"1 user\(s\) had no earlier text"):
        out = load_amazonqa(path)
    assert [(r.user_id, r.query, r.response) for r in out] == [
        ("A", "Does it fit a 15 inch laptop?", "Yes, it does."), ("C", "Battery life?", "About 10 hours.")]
    assert out[0].history == ("Great bag, sturdy straps.", "Is the strap padded?")  # reviews, then earlier questions
    assert out[1].history == ("Works well on trips.",)
    with pytest.warns(UserWarning):
        two = load_amazonqa(path, examples_per_user=2)
    assert [r.query for r in two if r.user_id == "A"] == ["Is the strap padded?", "Does it fit a 15 inch laptop?"]
    bad = write_lines(tmp_path / "bad.jsonl", [{"user_id": "A", "question": "q?"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:1: missing answer")):
        load_amazonqa(bad)


def test_load_reddit(tmp_path):
    path = write_lines(tmp_path / "rc.jsonl", [
        {"author": "alice", "body": "I brew my own beer.", "subreddit": "Homebrewing", "created_utc": 1},
        {"author": "alice", "body": "[deleted]", "created_utc": 2},
        {"author": "alice", "body": "Use a hydrometer for that.", "parent_body": "How do I measure alcohol?",
         "subreddit": "Homebrewing", "created_utc": 3},
        {"author": "bob", "body": "Only comment.", "parent_body": "Hi?"},
        {"author": "[deleted]", "body": "gone"},
    ])
    with pytest.warns(UserWarning, match=r"1 user\(s\)"):
        out = load_reddit(path)
    assert len(out) == 1
    r = out[0]
    assert (r.user_id, r.query, r.response) == ("alice", "How do I measure alcohol?", "Use a hydrometer for that.")
    assert r.history == ("I brew my own beer.",) and r.profile == "Posts in r/Homebrewing"
    bad = write_lines(tmp_path / "bad.jsonl", [{"author": "x"}, "[1"])
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:1: missing comment body")):
        load_reddit(bad)


def test_load_lamp(tmp_path):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([
        {"id": "310", "input": "Generate a headline for: markets rally", "profile": [
            {"id": "1", "title": "Stocks fall", "text": "Markets dropped today.", "date": "2020"},
            {"id": "2", "text": "Only text."}]},
        {"id": "311", "input": "Headline?", "profile": [{"id": "9", "text": "x"}], "output": "inline gold",
         "user_id": "user-9"},
    ]))
    outputs = tmp_path / "o.json"
    outputs.write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "310", "output": "Markets rally again"}]}))
    out = load_lamp(questions, outputs)
    assert [(r.user_id, r.response) for r in out] == [("lamp-310", "Markets rally again"), ("user-9", "inline gold")]
    assert out[0].history == ("title: Stocks fall; text: Markets dropped today.", "Only text.") and out[0].profile == ""
    with pytest.raises(DataFormatError, match=re.escape(f"{questions}:item 0: no gold output for id '310'")):
        load_lamp(questions)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_lamp(questions, on_error="skip")) == 1
    empty = tmp_path / "e.jsonl"
    write_lines(empty, [{"id": "1", "input": "q", "profile": [], "output": "a"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{empty}:1: field 'history' is empty")):
        load_lamp(empty)


# --------------------------------------------------------------------------- split
def many(n_users=20, per_user=2):
    return [rec(f"user{i:02d}", query=f"q{j}?") for i in range(n_users) for j in range(per_user)]


def test_split_users_by_user_and_reproducible():
    records = many()
    train, val, test = split_users(records, seed=3)
    ids = [{r.user_id for r in s} for s in (train, val, test)]
    assert [len(s) for s in ids] == [14, 2, 4]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(s) for s in (train, val, test)) == len(records)
    assert split_users(records, seed=3) == (train, val, test)
    assert {r.user_id for r in split_users(list(reversed(records)), seed=3)[2]} == ids[2]  # depends on ids, not order
    assert split_users(records, seed=4) != (train, val, test)
    # a positive fraction gets a user when there are enough users
    assert [len({r.user_id for r in s}) for s in split_users(many(3), (0.8, 0.1, 0.1))] == [1, 1, 1]
    assert [len(s) for s in split_users(many(5, 1), (1.0, 0.0))] == [5, 0]


@pytest.mark.parametrize("fractions, exc, match", [
    ((0.5, 0.4), ValueError, "must sum to 1"),
    ((1.2, -0.2), ValueError, r"fractions\[1\] must be a finite number >= 0"),
    ((), TypeError, "non-empty sequence"),
    ("0.7", TypeError, "non-empty sequence"),
    ((float("nan"), 1.0), ValueError, r"fractions\[0\]"),
    ((True, 0.0), ValueError, r"fractions\[0\]"),
])
def test_split_users_bad_fractions(fractions, exc, match):
    with pytest.raises(exc, match=match):
        split_users(many(4), fractions)


def test_split_users_bad_input():
    with pytest.raises(TypeError, match="records must be a sequence"):
        split_users(iter(many(2)))
    with pytest.raises(TypeError, match=r"records\[0\] must be a Record"):
        split_users([{"user_id": "u"}])
    with pytest.raises(TypeError, match="seed must be an int"):
        split_users(many(2), seed=1.5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), a=st.integers(0, 10), b=st.integers(0, 10), c=st.integers(1, 10), seed=st.integers(0, 99))
def test_split_users_property(n, a, b, c, seed):
    total = a + b + c
    records = many(n, 1)
    parts = split_users(records, (a / total, b / total, c / total), seed=seed)
    sets = [{r.user_id for r in p} for p in parts]
    assert sum(len(s) for s in sets) == n and len(set().union(*sets)) == n
    for i, f in enumerate((a, b, c)):
        assert abs(len(sets[i]) - n * f / total) < 3
        if f and n >= sum(1 for x in (a, b, c) if x):
            assert sets[i]  # a positive fraction gets at least one user


def test_group_and_user_memories():
    rs = [rec("a", history=["x"]), rec("b", history=["z"]), rec("a", history=["x", "y"], profile="p")]
    assert {k: len(v) for k, v in group_by_user(rs).items()} == {"a": 2, "b": 1}
    mems = user_memories(rs)
    assert mems[0] == UserMemory("a", "p", ("x", "y")) and mems[1].history == ("z",)


def test_record_keys_tell_a_repeated_query_apart_and_match_saved_rows():
    rs = [rec("a", response="1"), rec("b"), rec("a", response="2"), rec("a", query="other")]
    keys = record_keys(rs)
    assert len(set(keys)) == 4 and keys[0][:2] == keys[2][:2]
    rows = [{"user_id": r.user_id, "query": r.query, "prediction": "p"} for r in rs]
    assert record_keys(rows) == keys
    # rows saved user by user (the CLIs' order) keep each user's records in order: the same keys
    by_user = [rows[0], rows[2], rows[3], rows[1]]
    assert sorted(record_keys(by_user)) == sorted(keys)
    with pytest.raises(TypeError, match=r"items\[1\] must be a Record or a mapping"):
        record_keys([rs[0], {"user_id": 1, "query": "q"}])


# --------------------------------------------------------------------------- tokenization
def labelled_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])


def test_format_memory_segments():
    segs = format_memory(UserMemory("u", "", ("one", "two")))
    assert segs == [("one", True), ("\n", False), ("two", True)]
    assert format_memory(UserMemory("u", "p", ("one",)), include_profile=False) == [("one", True)]


def test_tokenize_memory_masks_template_and_chunks(tiny_tokenizer):
    mem = UserMemory("u7", "runner", ("My knee hurts when I run.", "I take ibuprofen."))
    (ex,) = tokenize_memory(mem, tiny_tokenizer, max_length=512)
    assert ex["user_id"] == "u7" and ex["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ex["input_ids"][1:]) == "Profile: runner\nMy knee hurts when I run.\nI take ibuprofen."
    assert labelled_text(tiny_tokenizer, ex) == "runnerMy knee hurts when I run.I take ibuprofen."
    assert ex["labels"][0] == IGNORE_INDEX
    chunks = tokenize_memory(mem, tiny_tokenizer, max_length=6)
    assert all(len(c["input_ids"]) <= 6 and c["input_ids"][0] == tiny_tokenizer.bos_token_id for c in chunks)
    assert all(any(lab != IGNORE_INDEX for lab in c["labels"]) for c in chunks)
    assert "".join(labelled_text(tiny_tokenizer, c) for c in chunks) == labelled_text(tiny_tokenizer, ex)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        tokenize_memory(mem, tiny_tokenizer, max_length=1)
    with pytest.raises(TypeError, match="memory must be a Record or UserMemory"):
        tokenize_memory({"history": ["x"]}, tiny_tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        tokenize_memory(mem, "gpt2")


def test_tokenize_instruction_chat_and_plain(tiny_tokenizer, tiny_chat_tokenizer):
    r = rec(query="Is a cold serious?", response="Usually not; rest and drink fluids.")
    ex = tokenize_instruction(r, tiny_chat_tokenizer, system_prompt="Be brief.")
    assert tiny_chat_tokenizer.decode(ex["input_ids"]) == (
        "<|system|>Be brief.</s>\n<|user|>Is a cold serious?</s>\n"
        "<|assistant|>Usually not; rest and drink fluids.</s>\n")
    assert labelled_text(tiny_chat_tokenizer, ex) == "Usually not; rest and drink fluids.</s>\n"
    assert ex["user_id"] == "u1"
    prompt = tokenize_instruction(r, tiny_chat_tokenizer, add_response=False)
    assert tiny_chat_tokenizer.decode(prompt["input_ids"]) == format_prompt(r.query, tiny_chat_tokenizer)
    assert set(prompt["labels"]) == {IGNORE_INDEX}

    plain = tokenize_instruction(r, tiny_tokenizer)
    assert tiny_tokenizer.decode(plain["input_ids"]) == (
        "<s>Question: Is a cold serious?\nAnswer: Usually not; rest and drink fluids.</s>")
    assert labelled_text(tiny_tokenizer, plain) == " Usually not; rest and drink fluids.</s>"
    assert format_prompt(r.query, tiny_tokenizer, system_prompt="S") == "S\n\nQuestion: Is a cold serious?\nAnswer:"
    forced = tokenize_instruction(r, tiny_chat_tokenizer, use_chat_template=False)
    assert tiny_chat_tokenizer.decode(forced["input_ids"]).startswith("Question:")
    with pytest.raises(ValueError, match="has no chat_template"):
        tokenize_instruction(r, tiny_tokenizer, use_chat_template=True)
    with pytest.raises(TypeError, match="record must be a Record"):
        tokenize_instruction(r.to_dict(), tiny_tokenizer)


@pytest.mark.parametrize("chat", [False, True])
def test_tokenize_instruction_truncation(tiny_tokenizer, tiny_chat_tokenizer, chat):
    tok = tiny_chat_tokenizer if chat else tiny_tokenizer
    long_query = " ".join(["headache"] * 60) + " what should I do?"
    long_resp = " ".join(["rest"] * 60)
    full = tokenize_instruction(rec(query=long_query, response=long_resp), tok, max_length=4096)
    n_resp = sum(lab != IGNORE_INDEX for lab in full["labels"])
    ex = tokenize_instruction(rec(query=long_query, response=long_resp), tok, max_length=64)
    assert len(ex["input_ids"]) <= 64 and len(ex["labels"]) == len(ex["input_ids"])
    kept = sum(lab != IGNORE_INDEX for lab in ex["labels"])
    assert min(n_resp, 32) <= kept < n_resp
    text = tok.decode(ex["input_ids"])
    assert "what should I do?" in text  # the query's end survives
    short = tokenize_instruction(rec(query="Hi there?", response=long_resp), tok, max_length=40)
    assert len(short["input_ids"]) == 40 and tok.decode(short["input_ids"]).count("Hi there?") == 1


def test_collate_pads_and_keeps_user_ids(tiny_chat_tokenizer):
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "user_id": "a"},
           {"input_ids": [8], "labels": [8], "user_id": "b"}]
    b = collate(exs, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["user_ids"] == ["a", "b"] and b["input_ids"].dtype == torch.long
    left = collate(exs, 0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["labels"][1].tolist() == [-100, -100, -100, 8]
    no_labels = collate([{"input_ids": [1]}], 0)
    assert "labels" not in no_labels and no_labels["user_ids"] == [""]
    for bad, match in [([], "non-empty sequence"), ([{"input_ids": []}], "is empty"),
                       ([exs[0], {"input_ids": [1]}], "every example has 'labels'"),
                       ([{"input_ids": [1, 2], "labels": [1]}], "'labels' has 1 tokens")]:
        with pytest.raises(ValueError, match=match):
            collate(bad, 0)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        collate(exs, None)
    with pytest.raises(ValueError, match="padding_side"):
        collate(exs, 0, padding_side="middle")
    # Collator with a real tokenizer and mixed users, through a DataLoader
    data = [tokenize_instruction(rec(f"u{i}", query="Q" * (i + 1) + "?"), tiny_chat_tokenizer) for i in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=Collator(tiny_chat_tokenizer))
    batch = next(iter(loader))
    assert batch["user_ids"] == ["u0", "u1", "u2"]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tiny_chat_tokenizer.pad_token_id).all()


def test_no_warnings_on_clean_input(tmp_path):
    path = write_jsonl([rec()], tmp_path / "ok.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_jsonl(path)


# =========================================================================== property tests
# Drawn text mixes plain words with the characters that break line-based formats: JSON escapes
# control characters (\n, \r, NUL, \x1c) but writes U+2028/U+2029/NEL raw with ensure_ascii=False,
# and str.splitlines() treats all of these as line breaks.
_TRICKY = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x00", "\t", " ",
           "😀", "👩‍⚕️", "é", "\\", '"', "{", "}", "[", "]", ":", ","]
_chunks = st.one_of(st.text(max_size=5), st.sampled_from(_TRICKY),
                    st.text(alphabet="abc xyz?.", min_size=1, max_size=6))
_any_text = st.lists(_chunks, max_size=6).map("".join)
_nonblank = st.tuples(_any_text, st.sampled_from(list("aZé😀?7")), _any_text).map("".join)
_long = st.tuples(_nonblank, st.integers(500, 3000)).map(lambda t: t[0] * t[1])
_content = st.one_of(_nonblank, _nonblank, _nonblank, _long)

_records = st.builds(Record, user_id=_nonblank, profile=st.one_of(st.just(""), _any_text, _content),
                     history=st.lists(_content, min_size=1, max_size=3), query=_content, response=_content)
_invalid_items = st.sampled_from([
    42, None, "a string", {"user_id": "u"}, {**rec().to_dict(), "history": []},
    {**rec().to_dict(), "history": ["ok", " "]}, {**rec().to_dict(), "query": "  "}, {**rec().to_dict(), "response": 3},
])


def _listing(d):
    return sorted(os.listdir(d))


@settings(max_examples=60, deadline=None)
@given(first=st.lists(_records, max_size=4), second=st.lists(_records, max_size=4),
       k=st.integers(0, 4), bad=_invalid_items, newline_at_end=st.booleans())
def test_jsonl_round_trip_and_atomic_write_property(first, second, k, bad, newline_at_end):
    """write_jsonl -> read_jsonl is the identity on any valid records (one physical line each);
    a write that fails at any point (invalid item k, the iterable raising, an I/O error) leaves
    the old file byte-identical and no temp file; a successful write replaces the file whole."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sub" / "data.jsonl"
        assert write_jsonl(first, path) == path
        assert read_jsonl(path) == first
        raw = path.read_bytes()
        assert raw.count(b"\n") == len(first) and (not first or raw.endswith(b"\n"))
        assert _listing(path.parent) == ["data.jsonl"]

        mixed = [r.to_dict() if i % 2 else r for i, r in enumerate(second)]
        mixed.insert(min(k, len(mixed)), bad)
        with pytest.raises((ValueError, TypeError), match=rf"records\[{min(k, len(second))}\]"):
            write_jsonl(mixed, path)

        def failing():
            yield from second[:k]
            raise RuntimeError("source failed")

        with pytest.raises(RuntimeError, match="source failed"):
            write_jsonl(failing(), path)
        with mock.patch("milp.data.os.fsync", side_effect=OSError("disk full")):
            with pytest.raises(OSError, match="disk full"):
                write_jsonl(second, path)
        assert path.read_bytes() == raw and _listing(path.parent) == ["data.jsonl"]

        write_jsonl((r.to_dict() if i % 2 else r for i, r in enumerate(second)), path)  # any iterable of both
        assert read_jsonl(path) == second and _listing(path.parent) == ["data.jsonl"]
        if not newline_at_end and second:  # a final line without "\n" still reads
            path.write_bytes(path.read_bytes()[:-1])
            assert read_jsonl(path) == second


# --------------------------------------------------------------------------- malformed lines
_BAD_JSON = ["{not json", '{"user_id": "u"', "nul", "}", "'single'", '{"a": 1}}', '{"history": ["x",]}', "{", '"open']
_NOT_OBJECT = ["[1, 2]", '"text"', "3", "null", "true", "[]"]
_BLANK = ["", "   ", "\t"]
_WRONG_TEXT = ["", "  ", 3.5, True, ["x"], {"a": "b"}]
_WRONG = {"user_id": _WRONG_TEXT, "query": _WRONG_TEXT, "response": _WRONG_TEXT,
          "profile": [3, True, ["x"], {"a": "b"}],
          "history": ["a string", [], [" "], ["ok", 3], 3, {"a": "b"}, [None]]}


def _schema_bad(draw, good):
    kind = draw(st.sampled_from(["missing", "mistyped", "mistyped", "null"]))
    name = draw(st.sampled_from(sorted(_WRONG)))
    if kind == "missing":
        return {k: v for k, v in good.items() if k != name}
    return {**good, name: None if kind == "null" else draw(st.sampled_from(_WRONG[name]))}


def _amazon_bad(draw, good):
    kind = draw(st.sampled_from(["missing", "mistyped"]))
    name = draw(st.sampled_from(["user_id", "question", "answer"]))
    if kind == "missing":
        return {k: v for k, v in good.items() if k != name}
    wrong = {"user_id": [True, ["u"], "  "], "question": [["q"], {"a": 1}, False, " "],
             "answer": [[], ["", " "], {"x": 1}, True]}
    return {**good, name: draw(st.sampled_from(wrong[name]))}


def _reddit_bad(draw, good):
    name = draw(st.sampled_from(["author", "body"]))
    if draw(st.booleans()):
        return {k: v for k, v in good.items() if k != name}
    return {**good, name: draw(st.sampled_from([["x"], {"a": 1}, True]))}


def _lamp_bad(draw, good):
    return draw(st.sampled_from([
        {k: v for k, v in good.items() if k != "input"}, {k: v for k, v in good.items() if k != "id"},
        {k: v for k, v in good.items() if k != "output"}, {k: v for k, v in good.items() if k != "profile"},
        {**good, "profile": "not a list"}, {**good, "profile": []}, {**good, "profile": [{"id": "1"}]},
        {**good, "profile": [3]}, {**good, "input": ["x"]},
    ]))


_GOOD_OBJECTS = {
    "jsonl": st.builds(Record, user_id=_nonblank, profile=_any_text, query=_nonblank, response=_nonblank,
                       history=st.lists(_nonblank, min_size=1, max_size=3)).map(Record.to_dict),
    "amazonqa": st.fixed_dictionaries({"user_id": st.sampled_from(["A", "B", "C"]), "question": _nonblank,
                                       "answer": _nonblank, "reviews": st.lists(_nonblank, max_size=2)}),
    "reddit": st.fixed_dictionaries({"author": st.sampled_from(["al", "bo"]), "body": _nonblank,
                                     "parent_body": _nonblank}),
    "lamp": st.fixed_dictionaries({"id": st.integers(0, 99).map(str), "input": _nonblank,
                                   "profile": st.lists(st.fixed_dictionaries({"text": _nonblank}), min_size=1,
                                                       max_size=2), "output": _nonblank}),
}
_BAD_OBJECT = {"jsonl": _schema_bad, "amazonqa": _amazon_bad, "reddit": _reddit_bad, "lamp": _lamp_bad}
_LOADERS = {"jsonl": read_jsonl, "amazonqa": load_amazonqa, "reddit": load_reddit, "lamp": load_lamp}


@st.composite
def _file_with_bad_lines(draw, fmt):
    """(lines, is_bad flags, layout): valid objects with malformed ones and blank lines at drawn positions."""
    layout = "jsonl" if fmt == "jsonl" else draw(st.sampled_from(["jsonl", "jsonl", "list"]))
    good = draw(st.lists(_GOOD_OBJECTS[fmt], min_size=1, max_size=5))
    n_bad = draw(st.integers(1, 7))
    bad = []
    for _ in range(n_bad):
        kinds = ["object", "not_object"] + (["json", "truncated"] if layout == "jsonl" else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "object":
            bad.append(_BAD_OBJECT[fmt](draw, draw(_GOOD_OBJECTS[fmt])))
        elif kind == "not_object":
            bad.append(json.loads(draw(st.sampled_from(_NOT_OBJECT))))
        elif kind == "json":
            bad.append(_Raw(draw(st.sampled_from(_BAD_JSON))))
        else:
            bad.append(_Raw(json.dumps(draw(_GOOD_OBJECTS[fmt]), ensure_ascii=False)[:-1]))
    blanks = [_Raw(b) for b in draw(st.lists(st.sampled_from(_BLANK), max_size=3))] if layout == "jsonl" else []
    items = [(x, False) for x in good] + [(x, True) for x in bad] + [(x, None) for x in blanks]
    return draw(st.permutations(items)), layout


class _Raw(str):
    """A line written as is (not JSON-encoded)."""


def _write_items(path, items, layout, ensure_ascii, newline):
    if layout == "list":
        path.write_text(json.dumps([x for x, _ in items], ensure_ascii=ensure_ascii, indent=1), encoding="utf-8")
        return
    lines = [x if isinstance(x, _Raw) else json.dumps(x, ensure_ascii=ensure_ascii) for x, _ in items]
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))


def _load(fmt, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _LOADERS[fmt](*args, **kw)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("fmt", sorted(_LOADERS))
@settings(max_examples=50, deadline=None)
@given(data=st.data(), ensure_ascii=st.booleans(), newline=st.sampled_from(["\n", "\n", "\r\n"]))
def test_malformed_lines_property(fmt, data, ensure_ascii, newline):
    """With on_error="raise" the error names path:line (1-based, blank lines counted) or
    path:item <i> of the FIRST bad entry; with "skip" the result is what the file without the
    bad entries gives, and one warning counts the bad entries and names the first five."""
    items, layout = data.draw(_file_with_bad_lines(fmt))
    where = []  # location of each entry as the error reports it
    for i, _ in enumerate(items):
        where.append(f"item {i}" if layout == "list" else i + 1)
    bad_at = [w for w, (_, flag) in zip(where, items) if flag]
    with tempfile.TemporaryDirectory() as d:
        path, clean = Path(d) / "in.jsonl", Path(d) / "clean.jsonl"
        _write_items(path, items, layout, ensure_ascii, newline)
        _write_items(clean, [it for it in items if not it[1]], layout, ensure_ascii, newline)
        with pytest.raises(DataFormatError) as info:
            _LOADERS[fmt](path)
        assert (info.value.path, info.value.line) == (str(path), bad_at[0]), str(info.value)
        assert str(info.value).startswith(f"{path}:{bad_at[0]}: ")

        out, msgs = _load(fmt, path, on_error="skip")
        expected, clean_msgs = _load(fmt, clean, on_error="skip")
        clean_msgs = [m.replace(str(clean), str(path)) for m in clean_msgs]
        assert out == expected and msgs[1:] == clean_msgs  # the malformed-lines warning comes first
        assert not any("malformed" in m for m in clean_msgs)
        assert f"skipped {len(bad_at)} malformed line(s): " in msgs[0]
        shown = re.findall(rf"{re.escape(str(path))}:(item \d+|\d+): ", msgs[0])
        assert shown == [str(w) for w in bad_at[:5]], msgs[0]
        assert (f"(+{len(bad_at) - 5} more)" in msgs[0]) == (len(bad_at) > 5)
        if fmt == "jsonl":
            assert out == [Record.from_dict(x) for x, flag in items if flag is False]


# --------------------------------------------------------------------------- loaders on generated files
_pool = st.sampled_from(["Does it fit?", "Is it loud?", " padded strap ", "é 😀"])
_snippet = st.one_of(_nonblank, _pool)  # a small pool makes repeated texts (dedup) likely


def _norm(v):
    return str(v) if isinstance(v, (int, float)) else v.strip()


def _dedup_model(items):
    return list(dict.fromkeys(items))


def _dump(path, objs, layout, ensure_ascii):
    if layout == "list":
        path.write_text(json.dumps(objs, ensure_ascii=ensure_ascii, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(o, ensure_ascii=ensure_ascii) + "\n" for o in objs), encoding="utf-8")


def _user_ids(n):
    """n distinct user ids as the files write them (str, padded str or int) and as the loaders read them."""
    raw = st.lists(st.one_of(_nonblank, st.integers(0, 50)), min_size=n, max_size=n, unique_by=lambda v: _norm(v))
    return raw.filter(lambda ids: all(_norm(u) not in ("[deleted]", "[removed]") for u in ids))


@st.composite
def _amazon_file(draw):
    ids = draw(_user_ids(draw(st.integers(1, 4))))
    rows = []
    for uid in ids:
        timed = draw(st.booleans())
        for _ in range(draw(st.integers(1, 4))):
            row = {"uid": uid, "q": draw(_snippet), "a": draw(_nonblank),
                   "reviews": draw(st.one_of(st.none(), _snippet, st.lists(st.one_of(_snippet, st.just("  ")),
                                                                            max_size=3))),
                   "t": draw(st.one_of(st.integers(-5, 5), st.floats(-5, 5))) if timed else None,
                   "profile": draw(st.one_of(st.none(), st.just(""), _nonblank))}
            obj = {draw(st.sampled_from(["user_id", "userID", "reviewerID"])): uid,
                   draw(st.sampled_from(["question", "questionText"])): row["q"]}
            form = draw(st.sampled_from(["answer", "answerText", "answers", "answers_obj"]))
            if form.startswith("answers"):
                others = draw(st.lists(_nonblank, max_size=2))
                lead = draw(st.lists(st.sampled_from(["", " ", None]), max_size=2))  # empty answers are passed over
                if form == "answers":
                    lead = [x for x in lead if x is not None]
                obj["answers"] = [{"answerText": x} if form == "answers_obj" else x for x in lead + [row["a"]] + others]
            else:
                obj[form] = row["a"]
            if row["reviews"] is not None:
                obj[draw(st.sampled_from(["reviews", "review_snippets", "reviewText"]))] = row["reviews"]
            if row["t"] is not None:
                obj[draw(st.sampled_from(["time", "unixTime", "timestamp"]))] = row["t"]
            if row["profile"] is not None:
                obj["profile"] = row["profile"]
            rows.append((row, obj))
    return draw(st.permutations(rows))


def _amazon_model(rows, examples_per_user, max_history):
    """The AmazonQA docstring: per user (first appearance), questions by time (file order on ties
    or without time); the last ``examples_per_user`` become examples with history = reviews, then
    earlier questions (duplicates dropped, last ``max_history`` kept); users with no history left out."""
    by_user = {}
    for pos, row in enumerate(rows):
        by_user.setdefault(_norm(row["uid"]), []).append((row["t"] or 0.0, pos, row))
    records, left_out = [], 0
    for user, entries in by_user.items():
        qs = [row for _, _, row in sorted(entries, key=lambda e: e[:2])]
        reviews = []
        for row in qs:
            rv = row["reviews"]
            rv = [] if rv is None else [rv] if isinstance(rv, str) else rv
            reviews += [r.strip() for r in rv if r.strip()]
        profile = next((row["profile"].strip() for row in qs if row["profile"]), "")
        made = 0
        for k in range(max(0, len(qs) - examples_per_user), len(qs)):
            history = _dedup_model(reviews + [row["q"].strip() for row in qs[:k]])[-(max_history or 10**9):]
            if history:
                records.append(Record(user, profile, history, qs[k]["q"].strip(), qs[k]["a"].strip()))
                made += 1
        left_out += not made
    return records, left_out


def _check_left_out_warning(msgs, n):
    found = [m for m in msgs if "had no earlier text" in m]
    assert len(found) == bool(n) and all(f": {n} user(s) had no earlier text" in m for m in found), msgs


@settings(max_examples=80, deadline=None)
@given(rows=_amazon_file(), examples_per_user=st.integers(1, 3), max_history=st.one_of(st.none(), st.integers(1, 3)),
       layout=st.sampled_from(["jsonl", "list"]), ensure_ascii=st.booleans())
def test_load_amazonqa_property(rows, examples_per_user, max_history, layout, ensure_ascii):
    expected, left_out = _amazon_model([r for r, _ in rows], examples_per_user, max_history)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "qa.jsonl"
        _dump(path, [o for _, o in rows], layout, ensure_ascii)
        out, msgs = _load("amazonqa", path, examples_per_user=examples_per_user, max_history=max_history)
    assert out == expected
    _check_left_out_warning(msgs, left_out)
    assert len(msgs) == bool(left_out)


@st.composite
def _reddit_file(draw):
    ids = draw(_user_ids(draw(st.integers(1, 3))))
    rows = []
    for uid in [*ids, "[deleted]"]:
        timed, profiled = draw(st.booleans()), draw(st.integers(0, 3)) == 0
        subs = draw(st.permutations("abcdefg"))
        for j in range(draw(st.integers(0 if uid == "[deleted]" else 1, 10))):
            how = draw(st.sampled_from(["new"] * 4 + ["again", "none"]))
            sub = {"new": subs[j % 7], "again": subs[0], "none": None}[how]
            gone = draw(st.integers(0, 4)) == 0
            row = {"uid": uid, "body": draw(st.sampled_from(["[deleted]", "[removed]"]) if gone else _snippet),
                   "parent": draw(st.one_of(st.none(), st.sampled_from(["", "  ", "[deleted]"]), _nonblank, _nonblank)),
                   "sub": sub,
                   "t": draw(st.integers(0, 6)) if timed else None,
                   "profile": draw(st.one_of(st.none(), _nonblank)) if profiled else None}
            obj = {draw(st.sampled_from(["author", "user_id"])): uid,
                   draw(st.sampled_from(["body", "text", "comment"])): row["body"]}
            if row["parent"] is not None:
                obj[draw(st.sampled_from(["parent_body", "parent_text", "parent", "context", "post"]))] = row["parent"]
            for key, name in (("sub", "subreddit"), ("profile", "profile")):
                if row[key] is not None:
                    obj[name] = row[key]
            if row["t"] is not None:
                obj[draw(st.sampled_from(["created_utc", "time", "timestamp"]))] = row["t"]
            rows.append((row, obj))
    return draw(st.permutations(rows))


def _reddit_model(rows, examples_per_user, max_history):
    """The Reddit docstring, profile left aside (returned as the subreddit counts of the history)."""
    gone = ("[deleted]", "[removed]")
    by_user = {}
    for pos, row in enumerate(rows):
        if _norm(row["uid"]) not in gone and row["body"].strip() not in gone:
            by_user.setdefault(_norm(row["uid"]), []).append((row["t"] or 0, pos, row))
    records, left_out = [], 0
    for user, entries in by_user.items():
        cs = [row for _, _, row in sorted(entries, key=lambda e: e[:2])]
        given_profile = next((row["profile"].strip() for row in cs if row["profile"]), "")
        has_parent = [k for k, row in enumerate(cs) if k and row["parent"] and row["parent"].strip() not in ("", *gone)]
        for k in has_parent[-examples_per_user:]:
            history = _dedup_model(row["body"].strip() for row in cs[:k])[-(max_history or 10**9):]
            subs = Counter(row["sub"] for row in cs[:k] if row["sub"])
            records.append((Record(user, "", history, cs[k]["parent"].strip(), cs[k]["body"].strip()),
                            given_profile, subs))
        left_out += not has_parent
    return records, left_out


@settings(max_examples=60, deadline=None)
@given(rows=_reddit_file(), examples_per_user=st.integers(1, 3), max_history=st.one_of(st.none(), st.integers(1, 3)),
       layout=st.sampled_from(["jsonl", "list"]))
def test_load_reddit_property(rows, examples_per_user, max_history, layout):
    """Per author, the last examples_per_user comments with a parent (not the first comment) become
    examples; deleted authors/comments are dropped; the profile is the given one, else the most
    frequent subreddits (at most 5) of the comments before the example."""
    expected, left_out = _reddit_model([r for r, _ in rows], examples_per_user, max_history)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rc.jsonl"
        _dump(path, [o for _, o in rows], layout, False)
        out, msgs = _load("reddit", path, examples_per_user=examples_per_user, max_history=max_history)
    assert [Record(r.user_id, "", r.history, r.query, r.response) for r in out] == [e[0] for e in expected]
    for r, (_, given_profile, subs) in zip(out, expected):
        if given_profile or not subs:
            assert r.profile == given_profile
            continue
        assert r.profile.startswith("Posts in r/")
        shown = r.profile[len("Posts in r/"):].split(", r/")
        assert len(shown) == len(set(shown)) == min(5, len(subs)) and set(shown) <= set(subs)
        counts = [subs[s] for s in shown]
        assert counts == sorted(counts, reverse=True) and all(subs[s] <= counts[-1] for s in set(subs) - set(shown))
    _check_left_out_warning(msgs, left_out)


@settings(max_examples=30, deadline=None)
@given(counts=st.dictionaries(st.sampled_from("abcdefghij"), st.integers(1, 3), min_size=1, max_size=10),
       data=st.data())
def test_load_reddit_subreddit_profile_property(counts, data):
    """Without a profile field the profile is "Posts in r/x, r/y" over the subreddits of the author's
    earlier comments: every one of them up to 5, most frequent first."""
    subs = data.draw(st.permutations([s for s, c in counts.items() for _ in range(c)]))
    rows = [{"author": "al", "body": f"comment {i}", "subreddit": s, "created_utc": i} for i, s in enumerate(subs)]
    rows.append({"author": "al", "body": "the answer", "parent_body": "a question?", "created_utc": len(rows)})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rc.jsonl"
        _dump(path, data.draw(st.permutations(rows)), "jsonl", False)
        (r,) = load_reddit(path)
    shown = r.profile.removeprefix("Posts in r/").split(", r/")
    assert r.profile.startswith("Posts in r/") and len(shown) == len(set(shown)) == min(5, len(counts))
    assert [counts[s] for s in shown] == sorted((counts[s] for s in shown), reverse=True)
    assert all(counts[s] <= counts[shown[-1]] for s in set(counts) - set(shown))
    assert r.history == tuple(f"comment {i}" for i in range(len(subs)))


@st.composite
def _lamp_item(draw):
    if draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(_nonblank, st.just("  ")))
    keys = draw(st.lists(st.sampled_from(["title", "text", "abstract", "score"]), max_size=3, unique=True))
    item = {k: draw(st.one_of(_nonblank, st.just(" "), st.integers(0, 9), st.none())) for k in keys}
    if draw(st.booleans()):
        item["id"] = draw(st.sampled_from(["1", 7]))
    if draw(st.booleans()):
        item["date"] = "2020-01-01"
    if draw(st.booleans()):
        item["tags"] = ["nested", "ignored"]
    return item


def _lamp_history_model(items):
    out = []
    for it in items:
        if isinstance(it, str):
            s = it.strip()
        else:
            parts = [(k, str(v).strip()) for k, v in it.items()
                     if k not in ("id", "date", "tags") and v is not None and str(v).strip()]
            s = parts[0][1] if len(parts) == 1 else "; ".join(f"{k}: {v}" for k, v in parts)
        if s:
            out.append(s)
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), max_history=st.one_of(st.none(), st.integers(1, 3)),
       layout=st.sampled_from(["jsonl", "list"]), gold_layout=st.sampled_from(["lamp", "list", "jsonl"]))
def test_load_lamp_property(data, n, max_history, layout, gold_layout):
    """One record per question, in file order: user_id (else "lamp-<id>"), query = input, response =
    the inline output or the gold for the id, history = the formatted profile items (empty dropped,
    last max_history kept), profile "".  A bad gold names its line (JSONL) or item (a list)."""
    questions, golds, expected = [], [], []
    for i in range(n):
        qid = data.draw(st.sampled_from([str(i), i, f"q-{i}"]))
        items = data.draw(st.lists(_lamp_item(), min_size=1, max_size=4))
        history = _lamp_history_model(items)
        if not history:
            items.append("fallback item")
            history.append("fallback item")
        q = {"id": qid, "input": data.draw(_nonblank), "profile": items}
        output = data.draw(_nonblank)
        if data.draw(st.booleans()):
            q["output"] = output
        else:
            golds.append({"id": qid, "output": output})
        user = data.draw(st.one_of(st.none(), st.just(""), _nonblank))
        if user is not None:
            q["user_id"] = user
        questions.append(q)
        expected.append(Record(user.strip() if user else f"lamp-{qid}", "", history[-(max_history or 10**9):],
                               q["input"].strip(), output.strip()))
    with tempfile.TemporaryDirectory() as d:
        qpath, gpath = Path(d) / "q.json", Path(d) / "o.json"
        _dump(qpath, questions, layout, False)
        if gold_layout == "lamp":
            gpath.write_text(json.dumps({"task": "LaMP_x", "golds": golds}), encoding="utf-8")
        else:
            _dump(gpath, golds, gold_layout, False)
        out, msgs = _load("lamp", qpath, gpath, max_history=max_history)
        assert out == expected and msgs == []
        # a malformed gold: named by its JSONL line (blank lines counted) or its item index
        k = data.draw(st.integers(0, len(golds)))
        bad, reason = data.draw(st.sampled_from([({"id": "x"}, "each gold must be an object"),
                                                 ({"id": "x", "output": ["a"]}, "output must be a string")]))
        bad_golds = [*golds[:k], bad, *golds[k:]]
        if gold_layout == "jsonl":
            lines = [json.dumps(g) for g in bad_golds]
            blank = data.draw(st.integers(0, len(lines)))
            lines.insert(blank, "")
            gpath.write_text("\n".join(lines) + "\n", encoding="utf-8")
            where = str(k + 1 + (blank <= k))
        else:
            _dump(gpath, {"task": "t", "golds": bad_golds} if gold_layout == "lamp" else bad_golds, "list", False)
            where = f"item {k}"
        with pytest.raises(DataFormatError, match=re.escape(f"{gpath}:{where}: {reason}")):
            load_lamp(qpath, gpath)


# --------------------------------------------------------------------------- split_users, more
@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 25), weights=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       seed=st.integers(-(2**40), 2**40))
def test_split_users_order_and_rounding_property(data, n, weights, seed):
    """Users with several interleaved records: each split holds whole users, in input order; the
    assignment depends on the user ids and the seed only (not on record order); each split's
    size is its quota rounded down or up whenever every positive quota is at least 1."""
    assume(sum(weights) > 0)
    fractions = [w / sum(weights) for w in weights]
    ids = data.draw(st.lists(_nonblank, min_size=n, max_size=n, unique=True))
    records = [Record(u, "", [f"h{j}"], f"q{j}?", "r") for u in ids for j in range(data.draw(st.integers(1, 3)))]
    records = data.draw(st.permutations(records))
    parts = split_users(records, fractions, seed=seed)
    sets = [{r.user_id for r in p} for p in parts]
    assert len(parts) == len(fractions) and sum(map(len, sets)) == len(set().union(*sets)) == n
    for p, s in zip(parts, sets):
        assert p == [r for r in records if r.user_id in s]  # whole users, original order
    shuffled = data.draw(st.permutations(records))
    assert [{r.user_id for r in p} for p in split_users(shuffled, fractions, seed=seed)] == sets
    assert split_users(list(records), fractions, seed=seed) == parts
    quotas = [f * n for f in fractions]
    if all(q >= 1 for q in quotas if q > 0):
        for s, q in zip(sets, quotas):
            assert math.floor(q - 1e-9) <= len(s) <= math.ceil(q + 1e-9), (len(s), q)


# --------------------------------------------------------------------------- tokenization, more
_ascii_text = st.text(alphabet="abcdefghij klmnop?.,'\n", min_size=1, max_size=80).filter(lambda s: s.strip())
_tok_text = st.one_of(_ascii_text, _nonblank)
# words numbered by position: no prefix of such a text is also a suffix, so "which end was kept" is decidable
_numbered = st.lists(st.sampled_from(["my", "knee", "hurts", "what", "should", "I", "do?"]), min_size=1,
                     max_size=30).map(lambda ws: " ".join(f"{w}{i}" for i, w in enumerate(ws)))


@settings(max_examples=100, deadline=None)
@given(profile=st.one_of(st.just(""), st.just("  "), _tok_text), history=st.lists(_tok_text, min_size=1, max_size=4),
       max_length=st.integers(1, 40), include_profile=st.booleans(), chat=st.booleans())
def test_tokenize_memory_property(tiny_tokenizer, tiny_chat_tokenizer, profile, history, max_length,
                                  include_profile, chat):
    """Chunks of <= max_length, each starting with the special prefix (BOS or nothing); labels equal
    the ids exactly on the user's own (stripped) profile/history text and IGNORE_INDEX elsewhere;
    the chunks are consecutive windows of the whole text, dropping only windows with no label."""
    tok = tiny_chat_tokenizer if chat else tiny_tokenizer
    prefix = [] if chat else [tok.bos_token_id]
    mem = UserMemory("u", profile, tuple(history))
    if max_length <= len(prefix):  # no room for any text after the special prefix
        with pytest.raises(ValueError, match="max_length must be an int >= 2"):
            tokenize_memory(mem, tok, max_length=max_length)
        return
    chunks = tokenize_memory(mem, tok, max_length=max_length, include_profile=include_profile)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    segments = ([("Profile: ", False), (profile.strip(), True), ("\n", False)]
                if include_profile and profile.strip() else [])
    for i, h in enumerate(history):
        segments += [("\n", False)] * bool(i) + [(h.strip(), True)]
    ids, labels = [], []
    for text, own in segments:
        ids += enc(text)
        labels += enc(text) if own else [IGNORE_INDEX] * len(enc(text))
    body = max_length - len(prefix)
    windows = [(ids[s:s + body], labels[s:s + body]) for s in range(0, len(ids), body)]
    windows = [(i, lab) for i, lab in windows if any(x != IGNORE_INDEX for x in lab)]
    assert [(c["input_ids"], c["labels"]) for c in chunks] == [
        (prefix + i, [IGNORE_INDEX] * len(prefix) + lab) for i, lab in windows]
    assert all(len(c["input_ids"]) <= max_length and c["user_id"] == "u" for c in chunks)
    trained = [x for c in chunks for x in c["labels"] if x != IGNORE_INDEX]
    assert tok.decode(trained) == "".join(t for t, own in segments if own)  # exactly the user's own text


def _kept_query_end(text, pre, post, query):
    """``text`` is a tail of ``pre + q + post`` for some tail ``q`` of ``query`` (the query's end is kept)."""
    if len(text) <= len(post):
        return post.endswith(text)
    if not text.endswith(post):
        return False
    body = text[: len(text) - len(post)]
    return any(pre.endswith(body[:j]) and query.endswith(body[j:]) for j in range(len(body) + 1))


@settings(max_examples=150, deadline=None)
@given(query=st.one_of(_numbered, _ascii_text, _nonblank), response=_tok_text, max_length=st.integers(4, 48),
       chat=st.booleans())
def test_tokenize_instruction_property(tiny_tokenizer, tiny_chat_tokenizer, query, response, max_length, chat):
    """Any record at any max_length >= 4: at most max_length tokens; labels IGNORE_INDEX on the
    prompt, then a prefix of the response tokens (response + EOS, or the template's end of turn)
    of at least min(all, max_length // 2) tokens; untouched when it fits; when cut, what is left of
    the prompt is a tail of the template around a tail of the query."""
    tok = tiny_chat_tokenizer if chat else tiny_tokenizer
    r = rec(query=query, response=response)
    full = tokenize_instruction(r, tok, max_length=10_000)
    n_prompt = next(i for i, x in enumerate(full["labels"]) if x != IGNORE_INDEX)
    resp_ids = full["input_ids"][n_prompt:]
    assert full["labels"] == [IGNORE_INDEX] * n_prompt + resp_ids
    decode = lambda ids, **kw: tok.decode(ids, clean_up_tokenization_spaces=False, **kw)  # noqa: E731
    if chat:
        pre, post, skip, answer = "<|user|>", "</s>\n<|assistant|>", False, f"{response.strip()}</s>\n"
    else:
        pre, post, skip, answer = "Question: ", "\nAnswer:", True, f" {response.strip()}</s>"
        assert resp_ids[-1] == tok.eos_token_id
    prompt_text = ("" if chat else "<s>") + pre + query.strip() + post
    assert (decode(full["input_ids"][:n_prompt]), decode(resp_ids)) == (prompt_text, answer)

    ex = tokenize_instruction(r, tok, max_length=max_length)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) <= max_length
    if len(full["input_ids"]) <= max_length:
        assert ex == full
        return
    kept = sum(x != IGNORE_INDEX for x in labels)
    assert kept >= min(len(resp_ids), max_length // 2)
    assert labels == [IGNORE_INDEX] * (len(ids) - kept) + resp_ids[:kept] and ids[len(ids) - kept:] == resp_ids[:kept]
    if query.isascii():  # byte-level tokens of ASCII text decode to exact substrings
        prompt_text = decode(ids[: len(ids) - kept], skip_special_tokens=skip)
        assert _kept_query_end(prompt_text, pre, post, query.strip()), (prompt_text, query)


def test_byte_order_mark_and_bytes_that_are_not_utf8(tmp_path):
    """A UTF-8 byte-order mark is not part of the first line (Windows editors write one); bytes
    that are not UTF-8 are a malformed line named by file:line, skipped with ``on_error="skip"``,
    and named by line in the other loaders (not a bare UnicodeDecodeError)."""
    good = [json.dumps(rec(f"u{i}").to_dict()).encode() for i in range(3)]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(good) + b"\r\n")
    assert [r.user_id for r in read_jsonl(bom)] == ["u0", "u1", "u2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good[0] + b"\n\n" + good[1][:-3] + b"\xff\"}\n" + good[2] + b"\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: not UTF-8 text \(byte 0xff\)"):
        read_jsonl(bad)
    with pytest.warns(UserWarning, match="bad.jsonl:3"):
        assert [r.user_id for r in read_jsonl(bad, on_error="skip")] == ["u0", "u2"]
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(b'{"user_id": "a", "question": "q", "answer": "a", "reviews": ["r"]}\n'
                   b'{"user_id": "a", "question": "q\xc3", "answer": "a"}\n')
    with pytest.raises(DataFormatError, match=r"qa.jsonl:2: not UTF-8"):
        load_amazonqa(qa)


def test_jsonl_with_a_broken_first_line_starting_with_a_bracket(tmp_path):
    """A JSONL file whose first line is broken and starts with ``[`` is JSONL with a bad line 1
    (skipped with ``on_error="skip"``), not one broken JSON list; a pretty-printed list that
    is broken is still reported at its line."""
    good = {"user_id": "A", "question": "Is the strap padded?", "answer": "Yes.", "reviews": ["Sturdy."]}
    path = write_lines(tmp_path / "qa.jsonl", ['[{"user_id": "A", "question": ', good, dict(good, question="Fit?")])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:1: invalid JSON")):
        load_amazonqa(path)
    with pytest.warns(UserWarning, match="skipped 1"):
        out = load_amazonqa(path, on_error="skip", examples_per_user=2)
    assert sorted(r.query for r in out) == ["Fit?", "Is the strap padded?"]
    pretty = tmp_path / "pretty.json"
    pretty.write_text('[\n  {"user_id": "A", "question": "q?", "answer": "a"},\n'
                      '  {"user_id": "B"\n  "question": 1}\n]\n')
    with pytest.raises(DataFormatError, match=re.escape(f"{pretty}:4: invalid JSON")):
        load_amazonqa(pretty, on_error="skip")


def test_lamp_golds_layout_is_detected_by_parsing_not_by_a_prefix(tmp_path):
    """LaMP's ``{"task", "golds"}`` file is recognised wherever ``"golds"`` stands (after a long
    ``task`` field too); extra data after it, and a broken JSONL gold line, are named by line."""
    questions = write_lines(tmp_path / "q.jsonl", [
        {"id": "1", "input": "q1", "profile": [{"text": "h"}]}, {"id": "2", "input": "q2", "profile": [{"text": "h"}]}])
    golds = [{"id": "1", "output": "a1"}, {"id": "2", "output": "a2"}]
    late = tmp_path / "late.json"
    late.write_text(json.dumps({"task": "LaMP " + "x" * 3000, "golds": golds}, indent=1))
    assert [r.response for r in load_lamp(questions, late)] == ["a1", "a2"]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"task": "t", "golds": golds}, indent=1) + "\n\n{}\n")
    n = json.dumps({"task": "t", "golds": golds}, indent=1).count("\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{extra}:{n + 3}: invalid JSON (Extra data")):
        load_lamp(questions, extra)
    broken_doc = tmp_path / "broken.json"
    broken_doc.write_text('{"task": "t",\n "golds": [\n  {"id": "1", "output": "a1"}\n  {"id": "2"}]}\n')
    with pytest.raises(DataFormatError, match=re.escape(f"{broken_doc}:4: invalid JSON")):
        load_lamp(questions, broken_doc)
    lines = write_lines(tmp_path / "g.jsonl", [golds[0], '{"id": "2", "output": ', golds[1]])
    with pytest.raises(DataFormatError, match=re.escape(f"{lines}:2: invalid JSON")):
        load_lamp(questions, lines)
    single = write_lines(tmp_path / "single.jsonl", [{"id": "1", "output": "only"}])  # one gold: a JSONL line
    with pytest.warns(UserWarning, match="no gold output for id '2'"):
        assert [r.response for r in load_lamp(questions, single, on_error="skip")] == ["only"]


@pytest.mark.parametrize("loader", ["load_amazonqa", "load_reddit", "load_lamp"])
def test_max_history_refuses_a_bool(tmp_path, loader):
    import milp.data as data

    path = write_lines(tmp_path / "x.jsonl", [{"user_id": "A"}])
    with pytest.raises(ValueError, match="max_history must be a positive int or None, got True"):
        getattr(data, loader)(path, max_history=True)
