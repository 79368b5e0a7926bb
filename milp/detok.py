"""An answer's text as its tokens come: incremental decoding and stop strings, in time per step
that does not grow with the answer.

A stream hands on an answer's text after every token, and a stop string is looked for in that
text. Decoding the whole answer at every step costs time in its length per step, its length
squared per answer: with SmolLM2's tokenizer about 0.3 µs per token, so 32 rows of 512-token
answers take about 5 ms of host time per decode step, as long as a whole decode step of a
1B-parameter model on a GPU. :class:`AnswerText` decodes a short window per step instead: the
tokens since the one before the text it last took (the method of Hugging Face's
text-generation-inference and vLLM). The window's decode, less the decode of its first tokens,
is what the new tokens add to the text; an addition that ends in an incomplete UTF-8 character
is held until a later token completes it (or the answer ends there).

What it gives is what the whole decode gives, at every step: :attr:`AnswerText.text` is
``tokenizer.decode(tokens, skip_special_tokens=True)``, :meth:`AnswerText.partial` is
:func:`partial_text` and :attr:`AnswerText.stopped` is :func:`stop_hit`. The tests check this
token by token for byte-level BPE (GPT-2, LLaMA 3, Qwen, SmolLM2), SentencePiece-style BPE with
byte fallback (LLaMA 2, Mistral) and WordPiece tokenizers, with and without transformers'
``clean_up_tokenization_spaces`` (which drops the space of " ." or " n't": a text is taken only
once it does not end in a space such a clean-up may drop, " n" or " 'r" say). One exception: while the tokens end
inside a character, a byte-fallback tokenizer spells every byte of the run of byte tokens as
U+FFFD, characters it had completed before included; :class:`AnswerText` keeps the text it had
until the character is complete (a stream it feeds does not step back). Where the readings
cannot be the whole decode's, it decodes the whole answer at every step, as those functions do:

* a tokenizer whose window decode does not extend the decode of the window's first tokens (it
  re-spelled text already taken);
* a check against the whole decode, at 8, 16, 32, ... tokens (twice the answer's tokens decoded
  in all), that fails.

Example:
    >>> class Chars:  # a tokenizer whose token ids are characters
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> t = AnswerText(Chars(), stops=["\\n\\n"])
    >>> for token in map(ord, "Rest.\\n\\nMore"):
    ...     t.append(token)
    ...     if t.stopped:
    ...         break
    >>> t.partial(), t.stopped, len(t.tokens)
    ('Rest.', True, 7)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["AnswerText", "cut_at_stops", "partial_text", "stop_hit"]

_INCOMPLETE = "\ufffd"  # what a decode gives for bytes that do not (yet) make a UTF-8 character
# the starts of the texts transformers' clean-up of spaces edits (PreTrainedTokenizerBase.clean_up_tokenization:
# " .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"): a text ending so may yet lose its space
_CLEAN_UP_STARTS = (" ", " '", " n", " n'", " 'v", " 'r")


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """``ids`` decoded as an answer is: special tokens skipped."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the first of ``stops`` in it (the one that starts first), and whether one is."""
    at = _first_stop(text, stops, 0)
    return (text[:at], True) if at is not None else (text, False)


def stop_hit(tokenizer: Any, ids: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of an answer's tokens holds one of its stop strings (a whole decode)."""
    return bool(stops) and cut_at_stops(decode(tokenizer, ids), stops)[1]


def partial_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[str] = ()) -> str:
    """The text of an answer's tokens so far, as a stream may hand it on, from a whole decode:
    before its first stop string, stripped, without trailing whitespace or a trailing
    incomplete UTF-8 character (the next token may complete them, or the answer end there and
    drop them), nor an end that may be the start of a stop string. :class:`AnswerText` gives
    the same, decoding only what is new."""
    return _partial(*cut_at_stops(decode(tokenizer, ids), stops), stops)


def _partial(text: str, hit: bool, stops: Sequence[str]) -> str:
    if not hit:
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - held]
    return text.strip().rstrip(_INCOMPLETE).rstrip()


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first of ``stops`` that starts at or after ``start`` in ``text`` starts (``None``: none)."""
    return min((k for k in (text.find(s, start) for s in stops) if k >= 0), default=None)


class AnswerText:
    """The text of one answer whose tokens come one step at a time (:meth:`append`,
    :meth:`extend` or :meth:`update`), decoded incrementally, and whether it holds one of
    ``stops`` (its stop strings). See the module doc: every reading equals the whole decode's.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``decode(ids, skip_special_tokens=)``).
        stops: the answer's stop strings (non-empty texts).
    """

    CHECK_FROM = 8  # the first check against the whole decode, at this many tokens; then at each doubling
    SETTLED = 4  # a character's bytes span fewer tokens than this (UTF-8: 4 bytes at most, 1 or more per token)

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids, skip_special_tokens=) method, got "
                            f"{type(tokenizer).__name__}")
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stops must be a sequence of non-empty strings, got {stops!r:.60}")
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.tokens: list[int] = []
        self._reach = max((len(s) for s in self.stops), default=1) - 1  # a stop may begin this far before new text
        self._taken = ""  # the decode of tokens[:_read]
        self._held = ""  # what tokens[_read:] add to it (may end in an incomplete character)
        self._start = self._read = 0  # the window is tokens[_start:]; tokens[_start:_read] is its known part
        self._start_text = ""  # the decode of tokens[_start:_read]
        self._searched = 0  # no stop string starts before this in the text, beyond _stop_at
        self._stop_at: int | None = None
        self._next_check = self.CHECK_FROM
        # transformers' clean-up drops the space of " .", " ?", " n't", " 're", ...: a text is not
        # taken while it ends in a space that a following token may make it drop
        self._cleans = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.whole = False
        """Whether it decodes the whole answer at every step (see the module doc)."""

    @property
    def text(self) -> str:
        """The decode of all tokens so far (special tokens skipped), as ``tokenizer.decode`` gives it."""
        return self._taken + self._held

    @property
    def stopped(self) -> bool:
        """Whether the text holds one of the stop strings."""
        return self._stop_at is not None

    def partial(self) -> str:
        """The answer so far as a stream may hand it on (:func:`partial_text`)."""
        text = self.text
        return _partial(text[:self._stop_at] if self._stop_at is not None else text, self.stopped, self.stops)

    def append(self, token: int) -> None:
        """Take the answer's next token."""
        self.extend((token,))

    def update(self, tokens: Sequence[int]) -> None:
        """Take the answer's tokens so far: ``tokens`` starts with those taken before, and only
        the ones after them are read (what :class:`milp.decode.Update` gives a row each step)."""
        if len(tokens) < len(self.tokens):
            raise ValueError(f"tokens has {len(tokens)} tokens, fewer than the {len(self.tokens)} taken before")
        self.extend(tokens[len(self.tokens):])

    def extend(self, tokens: Sequence[int]) -> None:
        """Take the answer's next tokens (one step's, or several)."""
        if not tokens:
            return
        self.tokens.extend(int(t) for t in tokens)
        if not self.whole:
            self._decode_window()
        if not self.whole and len(self.tokens) >= self._next_check:
            self._next_check = 2 * len(self.tokens)
            whole = decode(self.tokenizer, self.tokens)
            # (not while a byte-fallback tokenizer spells a character's first bytes as U+FFFD)
            self.whole = whole != self.text and not whole.endswith(_INCOMPLETE)
        if self.whole:
            self._taken, self._held, self._searched = decode(self.tokenizer, self.tokens), "", 0
            self._stop_at = None  # a re-spelled text: its stop strings found again
        self._find_stops()

    def _open_end(self, text: str) -> bool:
        """Whether ``text`` ends where the tokens that follow may change it: in an incomplete
        character, or (a tokenizer that cleans up spaces) in the start of a text the clean-up edits."""
        return text.endswith(_INCOMPLETE) or (self._cleans and text.endswith(_CLEAN_UP_STARTS))

    def _decode_window(self) -> None:
        window = decode(self.tokenizer, self.tokens[self._start:])
        if self._open_end(window):  # wait for the rest of a character, or what follows a space
            if window.startswith(self._start_text):
                self._held = window[len(self._start_text):]
            elif window.endswith(_INCOMPLETE):  # a byte-fallback tokenizer spells the run's bytes U+FFFD meanwhile
                self._held = ""
            else:  # it re-spelled text already taken
                self.whole = True
                return
            if len(self.tokens) - self._read > 2 * self.SETTLED:  # a long run that keeps its end open
                self._take_settled(window)
            return
        if not window.startswith(self._start_text):  # it re-spelled text already taken
            self.whole = True
            return
        self._take(window, len(self.tokens))

    def _take(self, text: str, end: int) -> None:
        """Take ``text``, the decode of ``tokens[_start:end]``, as the text's up to ``end``."""
        new = text[len(self._start_text):]
        if not new:
            self._held = ""
            return
        start_text = decode(self.tokenizer, self.tokens[self._read:end])  # the next window's known part
        if self._cleans and start_text.endswith(_CLEAN_UP_STARTS):  # cleaned up alone, its end is open
            self._held = new
            return
        self._taken += new
        self._held = ""
        self._start, self._read, self._start_text = self._read, end, start_text

    def _take_settled(self, window: str) -> None:
        """Take the text of the tokens before the last :attr:`SETTLED` ones where it is settled:
        its end is not open, the window's text starts with it and the last tokens add text after
        it (so no character it ends in is still waiting for bytes). Keeps the window short on an
        answer whose text keeps ending open: mostly bytes that make no character (a random or
        damaged model's), or short words."""
        end = len(self.tokens) - self.SETTLED
        head = decode(self.tokenizer, self.tokens[self._start:end])
        if (not (self._cleans and head.endswith(_CLEAN_UP_STARTS)) and len(window) > len(head)
                and window.startswith(head) and head.startswith(self._start_text)):
            self._take(head, end)
            window = decode(self.tokenizer, self.tokens[self._start:])
            self._held = window[len(self._start_text):] if window.startswith(self._start_text) else ""

    def _find_stops(self) -> None:
        if not self.stops:
            return
        text = self.text
        at = _first_stop(text, self.stops, max(0, self._searched - self._reach))
        if at is not None and (self._stop_at is None or at < self._stop_at):
            self._stop_at = at
        self._searched = len(self._taken)  # the held end is looked at again once taken
