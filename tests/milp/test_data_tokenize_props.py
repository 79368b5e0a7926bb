"""Property tests of the tokenization half of milp.data (format_memory, tokenize_memory, format_prompt,
tokenize_instruction, collate/Collator) on drawn texts — non-ASCII, emoji, combining marks, text
with surrounding whitespace — and on tokenizers of several kinds: with BOS and no chat template,
with a chat template and no BOS, one that appends EOS after the text with pad == eos, one whose
template writes a default system prompt (as SmolLM2's does), and one whose generation prompt is not
a prefix of the rendered conversation.  The properties: a truncated prompt is built from a true
tail of the query (never from text the user did not write); format_prompt is the text of the
generation prompt that tokenize_instruction builds; the generation prompt is the training
example's prompt; a blank system prompt is no system prompt; EOS is appended exactly when the
tokenizer has one; memory chunks never hold the tokenizer's special suffix and are the same for a
Record and its UserMemory; padding with pad == eos keeps every trained EOS label."""
from __future__ import annotations

import copy

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import processors

from milp.data import (
    IGNORE_INDEX,
    Collator,
    Record,
    UserMemory,
    format_memory,
    format_prompt,
    tokenize_instruction,
    tokenize_memory,
)

SETTINGS = settings(max_examples=50, deadline=None)

_word = st.sampled_from(["knee", "tea", "what?", "run", "é", "ß", "日本", "😀", "🇫🇷", "a\u0301", "x\ty", "ok,"])
_text = st.lists(_word, min_size=1, max_size=12).map(" ".join)
_padded = st.tuples(st.sampled_from(["", " ", "\n", " \t"]), _text, st.sampled_from(["", " ", "\n "])).map("".join)
_system = st.one_of(st.none(), st.just(""), _text)

# the generation prompt is "<|assistant|>\n", but an assistant message renders as "<|assistant|>" + content
_NON_PREFIX_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# SmolLM2's shape: a default system message when the conversation has none
_DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|system|>You are helpful.</s>\n{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class _Toks(dict):
    def __repr__(self) -> str:  # the tokenizers' repr would bury hypothesis's report
        return f"<tokenizers {sorted(self)}>"


@pytest.fixture(scope="module")
def toks(tiny_tokenizer, tiny_chat_tokenizer):
    """name -> (tokenizer, special prefix, uses a chat template)."""
    eos_suffix = copy.deepcopy(tiny_tokenizer)  # no BOS, EOS appended after the text, pad == eos
    eos_suffix.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos_suffix.eos_token_id)])
    eos_suffix.pad_token = eos_suffix.eos_token
    non_prefix = copy.deepcopy(tiny_chat_tokenizer)
    non_prefix.chat_template = _NON_PREFIX_TEMPLATE
    default_system = copy.deepcopy(tiny_chat_tokenizer)
    default_system.chat_template = _DEFAULT_SYSTEM_TEMPLATE
    default_system.pad_token = default_system.eos_token
    return _Toks({"bos": (tiny_tokenizer, [tiny_tokenizer.bos_token_id], False),
            "chat": (tiny_chat_tokenizer, [], True),
            "eos_suffix": (eos_suffix, [], False),
            "non_prefix": (non_prefix, [], True),
            "default_system": (default_system, [], True)})


_names = st.sampled_from(["bos", "chat", "eos_suffix", "non_prefix", "default_system"])


def _rec(query="Is it bad?", response="Rest.", profile="", history=("h",)):
    return Record("u", profile, list(history), query, response)


def _split(ex):
    n = next((i for i, x in enumerate(ex["labels"]) if x != IGNORE_INDEX), len(ex["labels"]))
    return ex["input_ids"][:n], ex["input_ids"][n:]


# --------------------------------------------------------------------------- instruction prompts
@SETTINGS
@example(name="chat", query="knee ", system=None)
@given(name=_names, query=_padded, system=_system)
def test_format_prompt_is_the_text_of_the_generation_prompt(toks, name, query, system):
    """format_prompt(query) is exactly the text whose tokens tokenize_instruction(add_response=False)
    feeds the model (after the special prefix), for a query with surrounding whitespace too.

    Was: with a chat template format_prompt did not strip the query (``"<|user|> q </s>"``) while
    tokenize_instruction, which trains and generates, strips it (``"<|user|>q</s>"``)."""
    tok, prefix, _ = toks[name]
    ex = tokenize_instruction(_rec(query=query), tok, max_length=100_000, system_prompt=system, add_response=False)
    assert ex["input_ids"][:len(prefix)] == prefix and set(ex["labels"]) == {IGNORE_INDEX}
    text = tok.decode(ex["input_ids"][len(prefix):], clean_up_tokenization_spaces=False)
    assert text == format_prompt(query, tok, system_prompt=system)


@SETTINGS
@example(name="bos", query="what?", blank=" ")
@example(name="chat", query="what?", blank="\n")
@given(name=_names, query=_padded, blank=st.sampled_from(["", " ", "\n", " \t "]))
def test_a_blank_system_prompt_is_no_system_prompt(toks, name, query, blank):
    """A system prompt of whitespace only says nothing: the prompt is the one without a system prompt
    (the baselines' "nothing to say" context adds no system message).

    Was: the plain template began with a blank line (``"\\n\\nQuestion: …"``) and a chat template got
    an empty system message (replacing a template's default system prompt)."""
    tok, _, _ = toks[name]
    assert format_prompt(query, tok, system_prompt=blank) == format_prompt(query, tok)
    for add_response in (False, True):
        assert (tokenize_instruction(_rec(query=query), tok, system_prompt=blank, add_response=add_response)
                == tokenize_instruction(_rec(query=query), tok, add_response=add_response))


@SETTINGS
@given(name=_names, query=_padded, response=_padded, system=_system)
def test_the_generation_prompt_is_the_training_prompt(toks, name, query, response, system):
    """Untruncated, the training example is the generation prompt followed by the labelled response:
    its unlabelled part equals tokenize_instruction(add_response=False), the labels equal the ids on
    the rest, and the labelled part decodes to the stripped response followed by EOS (plain: a space
    before it) or by the template's end of turn."""
    tok, _, chat = toks[name]
    r = _rec(query=query, response=response)
    ex = tokenize_instruction(r, tok, max_length=100_000, system_prompt=system)
    gen = tokenize_instruction(r, tok, max_length=100_000, system_prompt=system, add_response=False)
    prompt, resp = _split(ex)
    assert prompt == gen["input_ids"] and ex["labels"] == [IGNORE_INDEX] * len(prompt) + resp
    decoded = tok.decode(resp, clean_up_tokenization_spaces=False)
    if not chat:
        assert decoded == f" {response.strip()}</s>" and resp[-1] == tok.eos_token_id
    else:
        assert decoded == f"{response.strip()}</s>" + ("" if name == "non_prefix" else "\n")


def test_no_eos_is_appended_when_the_tokenizer_has_none(tiny_tokenizer):
    """The plain template ends the response with EOS only when the tokenizer has one."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    _, resp = _split(tokenize_instruction(_rec(response="Rest well."), tok))
    assert resp == tok(" Rest well.", add_special_tokens=False)["input_ids"]


def _prompt_tails(tok, query, system):
    """The untruncated generation prompts for every non-blank character tail of ``query``."""
    q = query.strip()
    return [tokenize_instruction(_rec(query=q[i:]), tok, max_length=100_000, system_prompt=system,
                                 add_response=False)["input_ids"] for i in range(len(q)) if q[i:].strip()]


@SETTINGS
@example(name="chat", query="ß á 日本", system=None, max_length=11)
@example(name="bos", query="knee 日本 é 😀 🇫🇷 🇫🇷 ß 😀 knee 😀 😀 日本 knee 日本", system=None, max_length=23)
@given(name=_names, query=_text, system=_system, max_length=st.integers(4, 40))
def test_a_truncated_prompt_holds_only_the_users_own_text(toks, name, query, system, max_length):
    """Truncated to max_length (a system prompt too), the response keeps its start, at least half the
    budget, and the prompt's tokens are the end of the untruncated prompt of some character tail of
    the query: the query is shortened from its start, and nothing is written that the user did not
    write.

    Was: the query was cut by tokens and decoded; a cut inside a multi-byte character (é, 日, an
    emoji) decoded to U+FFFD, whose bytes were then tokenized into the prompt (``"ß á 日本"`` at
    max_length 11 gave a prompt starting with the tokens of ``"\\ufffd"``)."""
    tok, _, _ = toks[name]
    r = _rec(query=query, response="Rest and drink water, then see a doctor if it gets worse.")
    ex = tokenize_instruction(r, tok, max_length=max_length, system_prompt=system)
    assert len(ex["input_ids"]) == len(ex["labels"]) <= max_length
    prompt, resp = _split(ex)
    _, whole = _split(tokenize_instruction(r, tok, max_length=100_000, system_prompt=system))
    assert resp == whole[:len(resp)] and len(resp) >= min(len(whole), max_length // 2)  # the response's start
    assert any(full[len(full) - len(prompt):] == prompt for full in _prompt_tails(tok, query, system)), (
        tok.decode(prompt))
    gen = tokenize_instruction(r, tok, max_length=max_length, system_prompt=system, add_response=False)
    assert len(gen["input_ids"]) <= max_length
    assert any(full[len(full) - len(gen["input_ids"]):] == gen["input_ids"]
               for full in _prompt_tails(tok, query, system)), tok.decode(gen["input_ids"])


# --------------------------------------------------------------------------- memory
@SETTINGS
@given(name=_names, profile=st.one_of(st.just(""), _padded), history=st.lists(_padded, min_size=1, max_size=4),
       max_length=st.integers(2, 30), include_profile=st.booleans())
def test_memory_chunks_of_any_tokenizer(toks, name, profile, history, max_length, include_profile):
    """For every tokenizer kind: a Record and its UserMemory give the same chunks; each chunk is the
    special prefix (never the tokenizer's special suffix such as an appended EOS) then a window of
    the memory text; the labelled tokens of all chunks are the user's own stripped text, in order."""
    tok, prefix, _ = toks[name]
    mem = UserMemory("u", profile, tuple(history))
    chunks = tokenize_memory(mem, tok, max_length=max_length, include_profile=include_profile)
    assert chunks == tokenize_memory(Record("u", profile, list(history), "q?", "r"), tok, max_length=max_length,
                                     include_profile=include_profile)
    body = []
    for c in chunks:
        assert len(c["input_ids"]) <= max_length and c["input_ids"][:len(prefix)] == prefix
        assert c["labels"][:len(prefix)] == [IGNORE_INDEX] * len(prefix)
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(c["input_ids"], c["labels"]))
        assert any(lab != IGNORE_INDEX for lab in c["labels"])
        body += c["input_ids"][len(prefix):]
    whole = tok("".join(t for t, _ in format_memory(mem, include_profile=include_profile)),
                add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in body or tok.eos_token_id in whole
    trained = [lab for c in chunks for lab in c["labels"] if lab != IGNORE_INDEX]
    own = "".join(t for t, is_own in format_memory(mem, include_profile=include_profile) if is_own)
    assert tok.decode(trained, clean_up_tokenization_spaces=False) == own


# --------------------------------------------------------------------------- batches
@SETTINGS
@given(queries=st.lists(_text, min_size=1, max_size=4), responses=st.lists(_text, min_size=4, max_size=4),
       side=st.sampled_from(["right", "left"]))
def test_padding_with_pad_equal_to_eos_keeps_every_trained_eos(toks, queries, responses, side):
    """With pad == eos, Collator pads with EOS but the padded positions have attention 0 and label
    IGNORE_INDEX while every example's trained EOS keeps its label; each row is its example."""
    tok, _, _ = toks["eos_suffix"]
    exs = [tokenize_instruction(_rec(query=q, response=r), tok) for q, r in zip(queries, responses)]
    batch = Collator(tok, padding_side=side)(exs)
    assert Collator(tok).pad_token_id == tok.eos_token_id
    for row, ex in enumerate(exs):
        mask = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][mask].tolist() == ex["input_ids"]
        assert batch["labels"][row][mask].tolist() == ex["labels"]
        assert set(batch["labels"][row][~mask].tolist()) <= {IGNORE_INDEX}
        assert batch["labels"][row].tolist().count(tok.eos_token_id) == ex["labels"].count(tok.eos_token_id) == 1
