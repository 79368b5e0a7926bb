"""milp.data: schema, JSONL I/O, loaders, the user split, tokenization and collation."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
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
