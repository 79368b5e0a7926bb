"""Personalization data: the record schema, JSONL I/O, dataset loaders, the user split,
and tokenization for memory injection and instruction tuning.

Schema
------
One JSON object per line::

    {"user_id": str, "profile": str, "history": [str, ...], "query": str, "response": str}

``history`` holds the user's *own* past text (oldest first), ``profile`` a short
description of the user (may be ``""``), ``query``/``response`` one example to answer.
A user may have several records (all sharing ``user_id``); :func:`split_users` keeps
them in one split.  Unknown extra keys in a JSON object are ignored.

MedDia conversion rule (:func:`load_meddia`)
--------------------------------------------
* **Turn order.** Each dialogue turn ``{"i": {"Assistant": a, "User": u}}`` is read as
  ``a`` then ``u`` (turn 0's Assistant greets, its User states the problem).
* **Cleaning** (:func:`clean_utterance`): whitespace collapsed; surrounding quotes
  (``" “ ” '``) stripped; a leading speaker label stripped — role words (``Doctor``,
  ``Dr.``, ``Assistant``, ``Physician``, ``AI`` → doctor; ``Patient``, ``User`` → patient;
  ``Me``/``You``/``Interviewer``/``Interviewee`` → neutral) and any other
  capitalised name label (``John:``) that labels at least two utterances of the same
  dialogue; text after an embedded second speaker label (``"... \\n\\nDoctor: ..."``) is cut.
* **Speakers.** A role label decides the speaker.  Otherwise speakers alternate: an
  unlabelled utterance is spoken by the other party than the previous non-empty one (the
  first one by its field: ``User`` = patient).  This repairs the dialogues whose fields
  swap roles after an empty turn.  Consecutive utterances of one speaker are merged;
  empty ones are dropped; utterances mentioning "simulation" or "AI language model" are
  dropped as generation artefacts.
* **Users.** One dialogue = one user, id ``meddia-<file tag>-<index>`` (``meddia-d2-0007``
  is dialogue 7 of ``dialogues2_cleaned.json``; ``d3`` for ``dialogues_3_cleaned.json``; a
  later file whose tag is taken gets ``d3-2``, ``d3-3`` …).
* **Examples.** A candidate example is a patient utterance (the query, ≥ 4 words) followed
  by the doctor's reply (the response, ≥ 8 words) with at least one earlier patient
  utterance.  Candidates are ranked by quality (+1 when the response is not a closing
  such as "You're welcome…", +1 when neither turn looks role-swapped: a query with
  doctor phrasing like "your symptoms"/"I recommend", a response saying ", doctor",
  "thank you … doctor" or "thank you for the advice"),
  then queries containing ``?``, then later position; the best
  ``examples_per_user`` (default **1**: the last question with a substantive answer) are
  kept, in dialogue order.  ``history`` = the patient's utterances before the query
  (the user's own words only; the doctor's turns are not the user's content).
  Dialogues with no candidate are skipped (≈ 4 % of the 704).
* **Profile.** The dialogues carry no link to ``profiles_4.json``, so ``profile`` is
  drawn from the user's own words: the first two sentences of their first utterance,
  at most 40 words (``profile="summary"``, the default), or ``""`` (``profile="none"``).
  It is therefore a subset of ``history[0]``; it never contains the query or response.
  :func:`load_meddia_profiles` parses the separate profile pool for other uses.

Memory-injection text (:func:`format_memory`, :func:`tokenize_memory`)
------------------------------------------------------------------------
``[BOS] "Profile: " <profile> "\\n" <history[0]> "\\n" <history[1]> "\\n" ...``

Labels (next-token targets) cover only the user's own content: the profile text and
every history item.  Masked (label ``-100``): the BOS/special prefix, the
``"Profile: "`` prefix and the ``"\\n"`` separators.  Each segment is tokenized separately
so the mask is exact.  A text longer than ``max_length`` is split into consecutive
chunks (each with the special prefix), so no history is dropped.

Instruction text (:func:`tokenize_instruction`)
------------------------------------------------
With a chat template: ``[system] user: query → assistant: response`` via
``tokenizer.apply_chat_template``; without one: ``"Question: {query}\\nAnswer: {response}<eos>"``.
Labels cover only the response tokens (and the template's end-of-turn tokens after it).
Over ``max_length``, the response keeps at least half the budget (truncated at its end)
and the query is shortened from its start (its end, where the question usually is,
is kept).

Example:
    >>> from milp.data import load_meddia, split_users
    >>> records = load_meddia()
    >>> train, val, test = split_users(records, seed=0)
    >>> len({r.user_id for r in train} & {r.user_id for r in test})
    0
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from .config import _check_bool, atomic_write_text

__all__ = [
    "IGNORE_INDEX",
    "Record",
    "UserMemory",
    "DataFormatError",
    "read_jsonl",
    "write_jsonl",
    "meddia_dir",
    "clean_utterance",
    "load_meddia",
    "load_meddia_profiles",
    "load_amazonqa",
    "load_reddit",
    "load_lamp",
    "split_users",
    "group_by_user",
    "record_keys",
    "user_memories",
    "format_memory",
    "tokenize_memory",
    "format_prompt",
    "tokenize_instruction",
    "collate",
    "Collator",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the loss (Hugging Face / ``torch.nn.CrossEntropyLoss`` default)."""

OnError = Literal["raise", "skip"]
_FIELDS = ("user_id", "profile", "history", "query", "response")


# =========================================================================== schema
class DataFormatError(ValueError):
    """A malformed input line; ``str(err)`` is ``"path:line: reason"``.

    For a file holding one JSON list, ``line`` is ``"item <i>"`` (0-based list index).
    """

    def __init__(self, path: str | os.PathLike[str], line: int | str, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes with ``"\\r\\n"`` and ``"\\r"`` read as ``"\\n"`` (as ``open`` reads text)."""
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text of ``raw`` (from :func:`_read_bytes`; at ``first_line`` 1 a byte-order mark is
    dropped); bytes that are not UTF-8 raise :class:`DataFormatError` at their line."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise DataFormatError(path, line, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def _read_text(path: Path) -> str:
    """The whole file as text (see :func:`_decode`)."""
    return _decode(_read_bytes(path), path)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(what: str, value: str) -> str:
    """``value`` unless it holds a lone surrogate (``json.loads`` makes one of an escape such as
    ``"\\ud83d"`` cut from a pair): not Unicode text, so it cannot be written as UTF-8 or tokenized."""
    bad = _SURROGATE.search(value)
    if bad:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate U+{ord(bad.group()):04X} "
                         f"at character {bad.start()})")
    return value


def _check_text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return _check_unicode(f"field {name!r}", value)


def _check_history(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"field 'history' must be a list of strings, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError("field 'history' is empty (memory injection needs at least one item of the user's own text)")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"field 'history' item {i} must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ValueError(f"field 'history' item {i} is empty")
        _check_unicode(f"field 'history' item {i}", item)
    return tuple(value)


@dataclass(frozen=True)
class Record:
    """One personalization example; validated on construction.

    ``history`` may be given as a list; it is stored as a tuple.  ``profile`` may be
    empty; every other field must be non-blank text.  Text holding a lone surrogate
    (not Unicode: it cannot be written as UTF-8 nor tokenized) is refused.

    Example:
        >>> r = Record("u1", "likes tea", ["I drink tea daily."], "What should I drink?", "Tea.")
        >>> r.to_dict()["history"]
        ['I drink tea daily.']
    """

    user_id: str
    profile: str
    history: tuple[str, ...]
    query: str
    response: str

    if TYPE_CHECKING:  # the generated __init__ takes any sequence as ``history`` (stored as a tuple)
        def __init__(self, user_id: str, profile: str, history: Sequence[str], query: str, response: str) -> None:
            ...

    def __post_init__(self) -> None:
        _check_text("user_id", self.user_id)
        _check_text("profile", self.profile, allow_empty=True)
        object.__setattr__(self, "history", _check_history(self.history))
        _check_text("query", self.query)
        _check_text("response", self.response)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Record:
        """Build from a JSON object; missing fields and wrong types raise clear errors.

        Example:
            >>> Record.from_dict({"user_id": "u", "profile": "", "history": ["hi"],
            ...                   "query": "q?", "response": "a"}).user_id
            'u'
        """
        if not isinstance(obj, Mapping):
            raise TypeError(f"a record must be a JSON object, got {type(obj).__name__}")
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(repr(m) for m in missing)}; expected {list(_FIELDS)}")
        return cls(**{f: obj[f] for f in _FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in schema order (``history`` as a list)."""
        return {"user_id": self.user_id, "profile": self.profile, "history": list(self.history),
                "query": self.query, "response": self.response}


@dataclass(frozen=True)
class UserMemory:
    """What memory injection writes for one user: their profile and merged history.

    Example:
        >>> UserMemory("u1", "", ("first", "second")).history
        ('first', 'second')
    """

    user_id: str
    profile: str
    history: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_text("user_id", self.user_id)
        _check_text("profile", self.profile, allow_empty=True)
        object.__setattr__(self, "history", _check_history(self.history))


def _check_on_error(on_error: Any) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _warn_skipped(path: Any, skipped: list[DataFormatError]) -> None:
    if skipped:
        shown = "; ".join(str(e) for e in skipped[:5])
        more = f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""
        warnings.warn(f"{path}: skipped {len(skipped)} malformed line(s): {shown}{more}", stacklevel=3)


def _as_path(path: Any, arg: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{arg}: {str(p)!r} does not exist")
    return p


def read_jsonl(path: str | os.PathLike[str], *, on_error: OnError = "raise", progress: bool = False) -> list[Record]:
    """Read schema records from a JSONL file (blank lines ignored).

    A malformed line (bad JSON, missing field, wrong type, empty history …) raises
    :class:`DataFormatError` ``"path:line: reason"`` with ``on_error="raise"`` (default);
    with ``on_error="skip"`` it is skipped and one warning lists the skipped lines.

    Example:
        >>> recs = read_jsonl("users.jsonl", on_error="skip")          # doctest: +SKIP
    """
    _check_on_error(on_error)
    p = _as_path(path)
    records: list[Record] = []
    skipped: list[DataFormatError] = []
    lines = _read_bytes(p).split(b"\n")
    for lineno, raw in enumerate(tqdm(lines, desc=f"reading {p.name}", unit=" lines", disable=not progress), 1):
        try:
            line = _decode(raw, p, lineno)  # a line that is not UTF-8 is a malformed line
        except DataFormatError as err:
            if on_error == "raise":
                raise
            skipped.append(err)
            continue
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(Record.from_dict(obj))
        except (ValueError, TypeError) as exc:
            bad = DataFormatError(p, lineno, str(exc))
            if on_error == "raise":
                raise bad from None
            skipped.append(bad)
    _warn_skipped(p, skipped)
    return records


def write_jsonl(records: Iterable[Record | Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSONL atomically (temp file in the same directory, then ``os.replace``).

    Dicts are validated through :meth:`Record.from_dict` first; on any error the target
    is left untouched.  Parent directories are created.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> r = Record("u1", "", ["I drink tea."], "Drink?", "Tea.")
        >>> write_jsonl([r], os.path.join(d, "x.jsonl")).name
        'x.jsonl'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path (str or os.PathLike), got {type(path).__name__}")
    target = Path(path)
    lines = []
    for i, rec in enumerate(records):
        if isinstance(rec, Mapping):
            try:
                rec = Record.from_dict(rec)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"records[{i}]: {exc}") from None
        elif not isinstance(rec, Record):
            raise TypeError(f"records[{i}] must be a Record or a dict, got {type(rec).__name__}")
        lines.append(json.dumps(rec.to_dict(), ensure_ascii=False))
    return atomic_write_text(target, "".join(line + "\n" for line in lines))


# =========================================================================== MedDia
_DOCTOR_LABELS = {"doctor", "dr", "physician", "assistant", "ai", "doc", "chatbot"}
_PATIENT_LABELS = {"patient", "user", "client"}
_NEUTRAL_LABELS = {"me", "you", "interviewer", "interviewee"}
_LABEL_RE = re.compile(r"^(?P<label>[A-Z][A-Za-z.'’]*(?:\s+[A-Z][A-Za-z.'’]*){0,2})\s*:\s*")
_QUOTES = "\"“”„'`"
_JUNK_RE = re.compile(r"simulation|ai language model|as an ai\b", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")
# Low-value responses (closings) and turns whose speaker looks swapped; demoted when ranking.
_CLOSING_RE = re.compile(r"^(you're welcome|you are welcome|thank you|thanks|goodbye|bye|take care|no problem|"
                         r"glad|my pleasure|i'm glad|alright|okay|ok)\b", re.IGNORECASE)
_DOCTOR_SPEECH_RE = re.compile(r"\b(your (symptoms|condition)|i would recommend|i recommend|would you like|"
                               r"how can i (help|assist))\b", re.IGNORECASE)
_PATIENT_SPEECH_RE = re.compile(r",\s*doctor\b|\bthank(s| you)\b[^.!?]{0,20}\bdoctor\b|\bmy (symptoms|condition)\b|"
                                r"\bthank(s| you) for (the|your) (advice|information|help|time)\b", re.IGNORECASE)


def meddia_dir() -> Path:
    """Directory of the MedDia files shipped in the package (``milp/assets/meddia``).

    Example:
        >>> (meddia_dir() / "LICENSE").is_file()
        True
    """
    return Path(__file__).resolve().parent / "assets" / "meddia"


def _label_role(label: str) -> str | None:
    first = label.split()[0].rstrip(".").lower()
    if first in _DOCTOR_LABELS:
        return "doctor"
    if first in _PATIENT_LABELS:
        return "patient"
    if first in _NEUTRAL_LABELS:
        return "neutral"
    return None


def _strip_quotes_ws(text: str) -> str:
    return text.strip().strip(_QUOTES).strip()


def clean_utterance(text: str, names: Iterable[str] = ()) -> tuple[str, str | None]:
    """Clean one MedDia utterance; return ``(text, role)`` with role ``"doctor"``,
    ``"patient"`` or ``None`` (no role label found).

    Strips surrounding quotes, a leading speaker label (role words, or one of ``names``)
    and anything after an embedded second speaker label; collapses whitespace.

    Example:
        >>> clean_utterance('Patient: "I have a headache."')
        ('I have a headache.', 'patient')
        >>> clean_utterance('John: Thanks.', names={"John"})
        ('Thanks.', None)
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    names = set(names)
    role: str | None = None
    s = text
    # An embedded second speaker ("...\n\nDoctor: ...") ends this utterance.
    labels = "|".join(sorted({re.escape(n) for n in names} | {"Doctor", "Dr", "Patient", "Assistant", "User", "Me"}))
    cut = re.search(rf"\n\s*[{_QUOTES}]?\s*(?:{labels})\.?\s*:", s)
    if cut and cut.start() > 0:
        s = s[: cut.start()]
    for _ in range(3):
        s = _strip_quotes_ws(s)
        m = _LABEL_RE.match(s)
        if not m:
            break
        label = m.group("label")
        r = _label_role(label)
        if r is None and label not in names:
            break
        if r in ("doctor", "patient") and role is None:
            role = r
        s = s[m.end():]
    s = re.sub(r"\s+", " ", _strip_quotes_ws(s))
    return s, role


def _dialogue_names(raw: list[str]) -> set[str]:
    """Non-role labels that label at least two utterances of a dialogue (speaker names)."""
    counts: Counter[str] = Counter()
    for t in raw:
        m = _LABEL_RE.match(_strip_quotes_ws(t))
        if m and _label_role(m.group("label")) is None:
            counts[m.group("label")] += 1
    return {n for n, c in counts.items() if c >= 2}


def _dialogue_utterances(dialogue: Any, where: str) -> list[tuple[str, str]]:
    """``[(speaker, text), ...]`` after cleaning, speaker repair and merging."""
    if not isinstance(dialogue, list):
        raise ValueError(f"{where}: a dialogue must be a list of turns, got {type(dialogue).__name__}")
    raw: list[tuple[str, str]] = []  # (field role, raw text)
    for i, turn in enumerate(dialogue):
        if not isinstance(turn, Mapping) or len(turn) != 1:
            raise ValueError(f"{where}: turn {i} must be a one-key object {{'<i>': {{'User', 'Assistant'}}}}")
        body = next(iter(turn.values()))
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: turn {i} must hold an object with 'User'/'Assistant'")
        for key, role in (("Assistant", "doctor"), ("User", "patient")):
            val = body.get(key, "")
            raw.append((role, val if isinstance(val, str) else ""))
    names = _dialogue_names([t for _, t in raw])
    out: list[tuple[str, str]] = []
    prev: str | None = None
    for field_role, text in raw:
        cleaned, label_role = clean_utterance(text, names)
        if not cleaned:
            continue
        if label_role is not None:
            speaker = label_role
        elif prev is None:
            speaker = field_role
        else:
            speaker = "doctor" if prev == "patient" else "patient"
        prev = speaker
        if _JUNK_RE.search(cleaned):
            continue
        if out and out[-1][0] == speaker:
            out[-1] = (speaker, out[-1][1] + " " + cleaned)
        else:
            out.append((speaker, cleaned))
    return out


def _candidate_quality(query: str, response: str) -> int:
    """0..2: +1 when the response is not a closing, +1 when the roles do not look swapped."""
    swapped = bool(_DOCTOR_SPEECH_RE.search(query)) or bool(_PATIENT_SPEECH_RE.search(response))
    return int(not _CLOSING_RE.match(response)) + int(not swapped)


def _summary(text: str, max_sentences: int = 2, max_words: int = 40) -> str:
    sentences = _SENTENCE_RE.split(text.strip())
    words = " ".join(sentences[:max_sentences]).split()
    return " ".join(words[:max_words])


def _file_tag(path: Path) -> str:
    digits = re.findall(r"\d+", path.stem)
    return f"d{digits[0]}" if digits else re.sub(r"[^A-Za-z0-9]+", "", path.stem)[:16] or "d"


def _file_tags(files: Sequence[Path]) -> list[str]:
    """:func:`_file_tag` of each file; a tag already taken by an earlier file gets ``-2``, ``-3`` …
    (``dialogues_1.json``, ``dialogues_1_more.json`` → ``d1``, ``d1-2``), so that no two dialogues
    share a user id."""
    seen: Counter[str] = Counter()
    tags = []
    for f in files:
        tag = _file_tag(f)
        seen[tag] += 1
        tags.append(tag if seen[tag] == 1 else f"{tag}-{seen[tag]}")
    return tags


def _read_json(path: Path) -> Any:
    """The JSON document in ``path``; broken JSON raises :class:`DataFormatError` at its line."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None


def _meddia_files(path: str | os.PathLike[str] | None) -> list[Path]:
    if path is None:
        base = meddia_dir()
    else:
        base = _as_path(path)
    if base.is_file():
        return [base]
    files = sorted(base.glob("dialogue*.json"))
    if not files:
        raise FileNotFoundError(f"path: no dialogue*.json files in {str(base)!r}")
    return files


def load_meddia(
    path: str | os.PathLike[str] | None = None,
    *,
    examples_per_user: int | None = 1,
    profile: Literal["summary", "none"] = "summary",
    min_query_words: int = 4,
    min_response_words: int = 8,
    max_users: int | None = None,
) -> list[Record]:
    """Convert the MedDia dialogues into schema records (one dialogue = one user).

    Args:
        path: a dialogue JSON file or a directory of ``dialogue*.json``; default: the
            copy shipped in ``milp/assets/meddia``.
        examples_per_user: examples kept per dialogue (``None`` = every candidate); see
            the module docstring for the ranking.
        profile: ``"summary"`` (first two sentences of the user's first utterance, ≤ 40
            words) or ``"none"`` (``""``).
        min_query_words, min_response_words: length floor for a candidate example.
        max_users: keep only the first N users (in file order).

    Example:
        >>> recs = load_meddia()
        >>> recs[0].user_id, len(recs) > 600
        ('meddia-d2-0000', True)
    """
    if examples_per_user is not None and not _is_positive_int(examples_per_user):
        raise ValueError(f"examples_per_user must be a positive int or None, got {examples_per_user!r}")
    if profile not in ("summary", "none"):
        raise ValueError(f"profile must be 'summary' or 'none', got {profile!r}")
    for name, v in (("min_query_words", min_query_words), ("min_response_words", min_response_words)):
        if not _is_positive_int(v):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_users is not None and not _is_positive_int(max_users):
        raise ValueError(f"max_users must be a positive int or None, got {max_users!r}")
    records: list[Record] = []
    users = skipped = 0
    files = _meddia_files(path)
    for f, tag in zip(files, _file_tags(files)):
        dialogues = _read_json(f)
        if not isinstance(dialogues, list):
            raise DataFormatError(f, 1, "expected a JSON list of dialogues")
        for index, dialogue in enumerate(dialogues):
            if max_users is not None and users >= max_users:
                break
            utts = _dialogue_utterances(dialogue, f"{f}: dialogue {index}")
            patient_before: list[str] = []
            candidates: list[tuple[int, str, str, list[str]]] = []  # (position, query, response, history)
            for pos, (speaker, text) in enumerate(utts):
                if speaker != "patient":
                    continue
                nxt = utts[pos + 1] if pos + 1 < len(utts) else None
                if (nxt is not None and patient_before and len(text.split()) >= min_query_words
                        and len(nxt[1].split()) >= min_response_words):
                    candidates.append((pos, text, nxt[1], list(patient_before)))
                patient_before.append(text)
            if not candidates:
                skipped += 1
                continue
            ranked = sorted(candidates, key=lambda c: (_candidate_quality(c[1], c[2]), "?" in c[1], c[0]), reverse=True)
            chosen = sorted(ranked if examples_per_user is None else ranked[:examples_per_user])
            user_id = f"meddia-{tag}-{index:04d}"
            prof = _summary(chosen[0][3][0]) if profile == "summary" else ""
            for _, query, response, history in chosen:
                records.append(Record(user_id, prof, history, query, response))
            users += 1
    logger.info("MedDia: %d users, %d records, %d dialogues without a usable example skipped",
                users, len(records), skipped)
    return records


def load_meddia_profiles(
    path: str | os.PathLike[str] | None = None, *, on_error: OnError = "skip"
) -> list[dict[str, Any]]:
    """Parse ``profiles_4.json`` (a JSON list of JSON *strings*) into dicts.

    These profiles are a separate pool with no link to the dialogues.  186 of the 3283
    strings in the shipped file are not valid JSON and one holds a non-object; these 187
    are skipped by default (one warning), or raise :class:`DataFormatError`
    (``path:item <i>: reason``) with ``on_error="raise"``.

    Example:
        >>> profs = load_meddia_profiles()                               # doctest: +SKIP
        >>> sorted(profs[0])                                             # doctest: +SKIP
        ['dialogue_preference', 'personal_information', 'symptoms']
    """
    _check_on_error(on_error)
    p = meddia_dir() / "profiles_4.json" if path is None else _as_path(path)
    items = _read_json(p)
    if not isinstance(items, list):
        raise DataFormatError(p, 1, "expected a JSON list of JSON strings")
    out: list[dict[str, Any]] = []
    skipped: list[DataFormatError] = []
    for i, s in enumerate(items):
        try:
            try:
                obj = json.loads(s) if isinstance(s, str) else s
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON string ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            out.append(obj)
        except ValueError as exc:
            err = DataFormatError(p, f"item {i}", str(exc))
            if on_error == "raise":
                raise err from None
            skipped.append(err)
    if skipped:
        warnings.warn(f"{p}: skipped {len(skipped)} malformed profile string(s)", stacklevel=2)
    return out


# =========================================================================== user-supplied formats
def _objects_after_first_line(text: str) -> bool:
    """Whether every non-blank line after the first is a JSON object on its own: JSONL, not a
    document spread over lines (a pretty-printed list or object has lines such as ``{"a": 1},``,
    ``{`` or ``]`` that are not)."""
    lines = [line for line in text.split("\n")[1:] if line.strip()]
    if not lines:
        return False
    for line in lines:
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except json.JSONDecodeError:
            return False
    return True


class _Leading(NamedTuple):
    """The JSON value a file's text opens with (:func:`_leading_value`)."""

    value: Any
    first_line: int       # the line it starts on
    multiline: bool       # whether it spans more than that line
    next_line: int | None  # the line where other text follows it, None when nothing does


def _leading_value(path: Path, text: str, opener: str, broken_is_jsonl: Callable[[str], bool]) -> _Leading | None:
    """The JSON value ``text`` opens with (after blank space), when its first character is
    ``opener``; ``None`` otherwise, or when that value is broken and ``broken_is_jsonl`` (of the
    text from that character on) says the file is JSONL, whose reader then names the broken
    line. A broken value otherwise raises :class:`DataFormatError` at its line."""
    stripped = text.lstrip()
    if not stripped.startswith(opener):
        return None
    lead = text[: len(text) - len(stripped)].count("\n")
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as exc:
        if broken_is_jsonl(stripped):
            return None
        raise DataFormatError(path, lead + exc.lineno, f"invalid JSON ({exc.msg})") from None
    rest = stripped[end:]
    after = lead + stripped[: end + len(rest) - len(rest.lstrip())].count("\n") + 1 if rest.strip() else None
    return _Leading(value, lead + 1, "\n" in stripped[:end], after)


def _json_list(path: Path, text: str) -> list[Any] | None:
    """The items when ``text`` is one JSON list, ``None`` when it is JSONL.

    A JSON list on the first line followed by more lines is a JSONL line (one that is not an
    object), not the file's list; so is a broken first line starting with ``[`` followed by
    lines that are each a JSON object.
    """
    found = _leading_value(path, text, "[", _objects_after_first_line)
    if found is None or (found.next_line is not None and not found.multiline):
        return None
    if found.next_line is not None:
        raise DataFormatError(path, found.next_line, "invalid JSON (Extra data)")
    return found.value


def _iter_json_objects(path: Path, on_error: OnError, progress: bool,
                       text: str | None = None) -> Iterator[tuple[int | str, Any]]:
    """``(line_or_index, obj)`` from a JSONL file or a file holding one JSON list (``text``: the
    file's text when the caller has read it already).

    JSONL lines end at ``"\\n"`` only (``"\\r\\n"`` and ``"\\r"`` read as ``"\\n"``), as
    :func:`read_jsonl` counts them: U+2028, U+2029, NEL … may stand unescaped inside JSON strings.
    """
    text = _read_text(path) if text is None else text
    items = _json_list(path, text)
    if items is not None:
        for i, obj in enumerate(tqdm(items, desc=f"reading {path.name}", disable=not progress)):
            yield f"item {i}", obj
        return
    for lineno, line in enumerate(tqdm(text.split("\n"), desc=f"reading {path.name}", disable=not progress), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            err = DataFormatError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})")
            if on_error == "raise":
                raise err from None
            yield lineno, err


def _pick(obj: Mapping[str, Any], keys: Sequence[str], what: str, *, required: bool = True) -> Any:
    for k in keys:
        if k in obj and obj[k] is not None and obj[k] != "":
            return obj[k]
    if required:
        raise ValueError(f"missing {what}: expected one of the fields {list(keys)}")
    return None


def _text(value: Any, what: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return _check_unicode(what, value).strip()


def _text_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, Mapping):
            keys = ("text", "reviewText", "answerText", "body")
            v = _pick(v, keys, what, required=not any(k in v for k in keys))  # {"answerText": ""} is an empty item
            if v is None:
                continue
        s = _text(v, what)
        if s:
            out.append(s)
    return out


def _order_key(obj: Mapping[str, Any], keys: Sequence[str], position: int) -> tuple[float, int]:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        try:
            t = float(v)
        except ValueError:
            continue
        if not math.isnan(t):  # NaN (JSON's NaN, "nan") is no time: it would make the sort order arbitrary
            return (t, position)
    return (0.0, position)  # no usable time: file order


def _dedup(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in items:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _check_common(examples_per_user: Any, max_history: Any, on_error: Any) -> None:
    if not _is_positive_int(examples_per_user):
        raise ValueError(f"examples_per_user must be a positive int, got {examples_per_user!r}")
    if max_history is not None and not _is_positive_int(max_history):
        raise ValueError(f"max_history must be a positive int or None, got {max_history!r}")
    _check_on_error(on_error)


def _parse_items(path: Path, on_error: OnError, progress: bool, parse: Callable[[Mapping[str, Any]], Any]
                 ) -> tuple[list[Any], list[DataFormatError]]:
    items, skipped = [], []
    for pos, (where, obj) in enumerate(_iter_json_objects(path, on_error, progress)):
        if isinstance(obj, DataFormatError):
            skipped.append(obj)
            continue
        try:
            if not isinstance(obj, Mapping):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            item = parse(obj)
            if item is not None:
                items.append((pos, item))
        except (ValueError, TypeError) as exc:
            err = DataFormatError(path, where, str(exc))
            if on_error == "raise":
                raise err from None
            skipped.append(err)
    return items, skipped


def _warn_users_without_history(path: Path, n: int) -> None:
    if n:
        warnings.warn(f"{path}: {n} user(s) had no earlier text to use as history and were left out", stacklevel=3)


def load_amazonqa(
    path: str | os.PathLike[str],
    *,
    examples_per_user: int = 1,
    max_history: int | None = None,
    on_error: OnError = "raise",
    progress: bool = False,
) -> list[Record]:
    """Load an AmazonQA-style file (JSONL, or one JSON list), one question per object.

    Fields (aliases in brackets; ``*`` = required):

    * ``user_id``\\* [``userID``, ``reviewerID``] — the asking user;
    * ``question``\\* [``questionText``];
    * ``answer``\\* [``answerText``] as a string, or ``answers``: a list of strings or of
      ``{"answerText": ...}`` (the first non-empty one is the response);
    * ``reviews`` [``review_snippets``, ``reviewText``] — the user's own review texts
      (string or list), optional;
    * ``time`` [``unixTime``, ``timestamp``] — numeric, orders a user's questions
      (file order otherwise); ``profile`` optional text.

    Per user, the last ``examples_per_user`` questions become examples;
    ``history`` = the user's reviews, then their earlier questions (the user's own text;
    answers are written by others and are not history).  Users with no history are left
    out (one warning).

    Example:
        >>> recs = load_amazonqa("qa.jsonl", examples_per_user=2)       # doctest: +SKIP
    """
    _check_common(examples_per_user, max_history, on_error)
    p = _as_path(path)

    def parse(obj: Mapping[str, Any]) -> dict[str, Any]:
        user = _text(_pick(obj, ("user_id", "userID", "reviewerID"), "user id"), "user id")
        question = _text(_pick(obj, ("question", "questionText"), "question"), "question")
        answer = _pick(obj, ("answer", "answerText", "answers"), "answer")
        if isinstance(answer, list):
            answers = _text_list(answer, "answers")
            if not answers:
                raise ValueError("field 'answers' holds no non-empty answer")
            answer = answers[0]
        answer = _text(answer, "answer")
        if not user or not question or not answer:
            raise ValueError("user id, question and answer must be non-empty")
        reviews = _pick(obj, ("reviews", "review_snippets", "reviewText"), "reviews", required=False)
        reviews = _text_list(reviews, "reviews")
        profile = _text(obj.get("profile") or "", "profile")
        return {"user": user, "question": question, "answer": answer, "reviews": reviews, "profile": profile,
                "order": obj}

    items, skipped = _parse_items(p, on_error, progress, parse)
    _warn_skipped(p, skipped)
    by_user: dict[str, list[tuple[tuple[float, int], dict[str, Any]]]] = {}
    for pos, it in items:
        by_user.setdefault(it["user"], []).append((_order_key(it["order"], ("time", "unixTime", "timestamp"), pos), it))
    records: list[Record] = []
    no_history = 0
    for user, keyed in by_user.items():
        rows = [it for _, it in sorted(keyed, key=lambda x: x[0])]
        reviews = _dedup(r for it in rows for r in it["reviews"])
        profile = next((it["profile"] for it in rows if it["profile"]), "")
        start = max(0, len(rows) - examples_per_user)
        made = False
        for k in range(start, len(rows)):
            history = _dedup(reviews + [it["question"] for it in rows[:k]])
            if max_history is not None:
                history = history[-max_history:]
            if not history:
                continue
            records.append(Record(user, profile, history, rows[k]["question"], rows[k]["answer"]))
            made = True
        no_history += not made
    _warn_users_without_history(p, no_history)
    return records


_DELETED = {"[deleted]", "[removed]"}


def load_reddit(
    path: str | os.PathLike[str],
    *,
    examples_per_user: int = 1,
    max_history: int | None = None,
    on_error: OnError = "raise",
    progress: bool = False,
) -> list[Record]:
    """Load a Reddit-style comment file (JSONL, or one JSON list), one comment per object.

    Fields (aliases in brackets; ``*`` = required):

    * ``author``\\* [``user_id``] — the commenting user (``[deleted]`` authors are dropped, a
      blank one is a malformed line);
    * ``body``\\* [``text``, ``comment``] — the comment (``[deleted]``/``[removed]`` dropped);
    * ``parent_body`` [``parent_text``, ``parent``, ``context``, ``post``] — the text the
      comment replies to, optional;
    * ``created_utc`` [``time``, ``timestamp``] — numeric, orders a user's comments;
    * ``subreddit`` optional; ``profile`` optional text.

    Per author, the last ``examples_per_user`` comments *that have a parent* become
    examples (query = parent text, response = the comment); ``history`` = the author's
    comments before it.  ``profile`` = the given ``profile`` field, else
    ``"Posts in r/a, r/b"`` from the subreddits of the history comments (most frequent
    first, up to 5), else ``""``.

    Example:
        >>> recs = load_reddit("comments.jsonl")                         # doctest: +SKIP
    """
    _check_common(examples_per_user, max_history, on_error)
    p = _as_path(path)

    def parse(obj: Mapping[str, Any]) -> dict[str, Any] | None:
        user = _text(_pick(obj, ("author", "user_id"), "author"), "author")
        body = _text(_pick(obj, ("body", "text", "comment"), "comment body"), "comment body")
        if not user:
            raise ValueError("author must be non-empty")
        if user in _DELETED or body in _DELETED or not body:
            return None
        parent = _pick(obj, ("parent_body", "parent_text", "parent", "context", "post"), "parent", required=False)
        parent = _text(parent, "parent text") if parent is not None else ""
        if parent in _DELETED:
            parent = ""
        sub = obj.get("subreddit")
        return {"user": user, "body": body, "parent": parent,
                "subreddit": _text(sub, "subreddit") if isinstance(sub, str) else "",
                "profile": _text(obj.get("profile") or "", "profile"), "order": obj}

    items, skipped = _parse_items(p, on_error, progress, parse)
    _warn_skipped(p, skipped)
    by_user: dict[str, list[tuple[tuple[float, int], dict[str, Any]]]] = {}
    for pos, it in items:
        key = _order_key(it["order"], ("created_utc", "time", "timestamp"), pos)
        by_user.setdefault(it["user"], []).append((key, it))
    records: list[Record] = []
    no_history = 0
    for user, keyed in by_user.items():
        rows = [it for _, it in sorted(keyed, key=lambda x: x[0])]
        given_profile = next((it["profile"] for it in rows if it["profile"]), "")
        targets = [k for k, it in enumerate(rows) if it["parent"] and k > 0][-examples_per_user:]
        made = False
        for k in targets:
            history = _dedup(it["body"] for it in rows[:k])
            if max_history is not None:
                history = history[-max_history:]
            profile = given_profile
            if not profile:
                subs = Counter(it["subreddit"] for it in rows[:k] if it["subreddit"])
                if subs:
                    profile = "Posts in " + ", ".join(f"r/{s}" for s, _ in subs.most_common(5))
            records.append(Record(user, profile, history, rows[k]["parent"], rows[k]["body"]))
            made = True
        no_history += not made
    _warn_users_without_history(p, no_history)
    return records


def _format_lamp_item(item: Any) -> str:
    if isinstance(item, str):
        return item.strip()
    if not isinstance(item, Mapping):
        raise ValueError(f"a LaMP profile item must be an object or a string, got {type(item).__name__}")
    parts = [(k, v) for k, v in item.items()
             if k not in ("id", "date") and v is not None and str(v).strip() != "" and not isinstance(v, (list, dict))]
    if len(parts) == 1:
        return str(parts[0][1]).strip()
    return "; ".join(f"{k}: {str(v).strip()}" for k, v in parts)


def _golds_document(path: Path, text: str) -> list[Any] | None:
    """The ``golds`` list when ``text`` is one JSON object holding it (LaMP's layout, wherever
    the key stands in it), ``None`` when it is JSONL or a JSON list of golds. A broken document
    is reported at its line (a JSONL file's first line is a whole object)."""
    found = _leading_value(path, text, "{", lambda _: False)
    if found is None or not isinstance(found.value, dict) or "golds" not in found.value:
        return None  # a JSON list, or a JSONL line of its own (one gold per line)
    if found.next_line is not None:
        raise DataFormatError(path, found.next_line, "invalid JSON (Extra data after the golds object)")
    if not isinstance(found.value["golds"], list):
        raise DataFormatError(path, found.first_line,
                              "expected {'golds': [{'id', 'output'}, ...]} or a list of {'id', 'output'}")
    return found.value["golds"]


def _read_lamp_outputs(path: Path) -> dict[str, str]:
    text = _read_text(path)
    golds = _golds_document(path, text)
    if golds is not None:
        entries: list[tuple[int | str, Any]] = [(f"item {i}", g) for i, g in enumerate(golds)]
    else:
        entries = list(_iter_json_objects(path, "raise", False, text))
    out = {}
    for where, g in entries:
        if not isinstance(g, Mapping) or "id" not in g or "output" not in g:
            raise DataFormatError(path, where, "each gold must be an object with 'id' and 'output'")
        try:
            out[_text(g["id"], "id")] = _text(g["output"], "output")  # the id as a question's is read
        except ValueError as exc:
            raise DataFormatError(path, where, str(exc)) from None
    return out


def load_lamp(
    questions_path: str | os.PathLike[str],
    outputs_path: str | os.PathLike[str] | None = None,
    *,
    max_history: int | None = None,
    on_error: OnError = "raise",
    progress: bool = False,
) -> list[Record]:
    """Load a LaMP-style benchmark file (JSON list or JSONL of questions).

    Each question: ``{"id"*, "input"*, "profile"*: [item, ...], "output"?, "user_id"?}``.
    The gold ``output`` is taken from the question or from ``outputs_path`` —
    ``{"task": ..., "golds": [{"id", "output"}, ...]}`` (LaMP's layout) or a list/JSONL
    of ``{"id", "output"}`` (ids read as the questions' are: stripped, a number as text).
    Mapping: ``user_id`` = the ``user_id`` field (a number as text, ``0`` too), else (absent,
    ``null`` or ``""``) ``"lamp-<id>"``; ``query`` = ``input``; ``response`` = ``output``; ``history`` = the
    profile items in file order, each formatted as its only text field, or as
    ``"key: value; key: value"`` over its fields except ``id``/``date`` (e.g. LaMP-4's
    ``title``/``text``); ``profile`` = ``""`` (LaMP's "profile" *is* the user's history).
    A question without a gold output or with an empty profile is a malformed item.

    Example:
        >>> recs = load_lamp("dev_questions.json", "dev_outputs.json")  # doctest: +SKIP
    """
    _check_common(1, max_history, on_error)
    p = _as_path(questions_path, "questions_path")
    golds = _read_lamp_outputs(_as_path(outputs_path, "outputs_path")) if outputs_path is not None else {}

    def parse(obj: Mapping[str, Any]) -> Record:
        qid = _text(_pick(obj, ("id",), "question id"), "id")
        query = _text(_pick(obj, ("input",), "input"), "input")
        output = obj.get("output")
        if output is None:
            if qid not in golds:
                raise ValueError(f"no gold output for id {qid!r} (give 'output' in the question or outputs_path)")
            output = golds[qid]
        items = obj.get("profile")
        if not isinstance(items, list):
            raise ValueError("missing field 'profile': expected a list of the user's items")
        history = [s for s in (_format_lamp_item(it) for it in items) if s]
        if max_history is not None:
            history = history[-max_history:]
        user = _pick(obj, ("user_id",), "user_id", required=False)
        user = f"lamp-{qid}" if user is None else _text(user, "user_id")
        return Record(user, "", history, query, _text(output, "output"))

    items, skipped = _parse_items(p, on_error, progress, parse)
    _warn_skipped(p, skipped)
    return [rec for _, rec in items]


# =========================================================================== split
def group_by_user(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by ``user_id``, users in order of first appearance.

    Example:
        >>> rs = [Record("a", "", ["x"], "q", "r"), Record("b", "", ["y"], "q", "r")]
        >>> list(group_by_user(rs))
        ['a', 'b']
    """
    out: dict[str, list[Record]] = {}
    for i, r in enumerate(records):
        if not isinstance(r, Record):
            raise TypeError(f"records[{i}] must be a Record, got {type(r).__name__}")
        out.setdefault(r.user_id, []).append(r)
    return out


def record_keys(items: Iterable[Record | Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    """A key per test record (or per saved prediction row, a mapping with ``user_id`` and
    ``query``) that tells records apart: ``(user_id, query, n)``, ``n`` counting the earlier
    items with the same user and query. A user asking the same query twice (a repeated
    question, with another reference answer or history) thus keeps two answers and two
    losses, while rows saved in the records' order map back to them one to one.

    Example:
        >>> rs = [Record("a", "", ["x"], "q", "r1"), Record("b", "", ["y"], "q", "r"),
        ...       Record("a", "", ["x"], "q", "r2")]
        >>> record_keys(rs)
        [('a', 'q', 0), ('b', 'q', 0), ('a', 'q', 1)]
    """
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for i, item in enumerate(items):
        if isinstance(item, Record):
            pair = (item.user_id, item.query)
        elif isinstance(item, Mapping) and isinstance(item.get("user_id"), str) and isinstance(item.get("query"), str):
            pair = (item["user_id"], item["query"])
        else:
            raise TypeError(f"items[{i}] must be a Record or a mapping with str 'user_id' and 'query', "
                            f"got {type(item).__name__}")
        n = seen.get(pair, 0)
        seen[pair] = n + 1
        keys.append((*pair, n))
    return keys


def user_memories(records: Iterable[Record]) -> list[UserMemory]:
    """One :class:`UserMemory` per user: the union of their records' histories (order
    kept, duplicates dropped) and their first non-blank profile.

    Example:
        >>> rs = [Record("a", "", ["x"], "q1", "r"), Record("a", "p", ["x", "y"], "q2", "r")]
        >>> user_memories(rs)[0].history, user_memories(rs)[0].profile
        (('x', 'y'), 'p')
    """
    out = []
    for user, recs in group_by_user(records).items():
        history = _dedup(h for r in recs for h in r.history)
        profile = next((r.profile for r in recs if r.profile.strip()), "")
        out.append(UserMemory(user, profile, tuple(history)))
    return out


def split_users(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> tuple[list[Record], ...]:
    """Split records *by user* into ``len(fractions)`` parts (train/val/test by default).

    Users (sorted ids) are shuffled with ``random.Random(seed)`` and dealt out in
    proportion to ``fractions`` (largest-remainder rounding; a split with a positive
    fraction gets at least one user when there are enough users).  A user's records
    all land in one split, in their original order.  Same records + seed → same split.

    Example:
        >>> rs = [Record(f"u{i}", "", ["h"], "q", "r") for i in range(10)]
        >>> [len(s) for s in split_users(rs, (0.7, 0.1, 0.2), seed=1)]
        [7, 1, 2]
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a sequence of Record, got {type(records).__name__}")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise TypeError(f"fractions must be a non-empty sequence of numbers, got {fractions!r}")
    fr = []
    for i, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
            raise ValueError(f"fractions[{i}] must be a finite number >= 0, got {f!r}")
        fr.append(float(f))
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(fr):.6g})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    groups = group_by_user(records)
    users = sorted(groups)
    random.Random(seed).shuffle(users)
    n = len(users)
    raw = [f * n for f in fr]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(fr)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fr) if f > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(fr)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    splits: list[list[Record]] = []
    start = 0
    for c in counts:
        chosen = set(users[start:start + c])
        splits.append([r for r in records if r.user_id in chosen])
        start += c
    return tuple(splits)


# =========================================================================== tokenization
_PROFILE_PREFIX = "Profile: "
_SEPARATOR = "\n"
_PLAIN_PROMPT = "Question: {query}\nAnswer:"


def _check_tokenizer(tokenizer: Any) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")


def _check_max_length(max_length: Any, minimum: int = 2) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
        raise ValueError(f"max_length must be an int >= {minimum}, got {max_length!r}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts *before* text (e.g. BOS / ``<s>``), if any."""
    with_sp = list(tokenizer("a")["input_ids"])
    without = _encode(tokenizer, "a")
    if not without:
        return []
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i:i + len(without)] == without:
            return with_sp[:i]
    return []


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def format_memory(memory: Record | UserMemory, *, include_profile: bool = True) -> list[tuple[str, bool]]:
    """Memory-injection text as ``(segment, is_user_content)`` pairs (see module docstring).

    Example:
        >>> format_memory(UserMemory("u", "runner", ("I run.", "My knee.")))
        [('Profile: ', False), ('runner', True), ('\\n', False), ('I run.', True), ('\\n', False), ('My knee.', True)]
    """
    if not isinstance(memory, (Record, UserMemory)):
        raise TypeError(f"memory must be a Record or UserMemory, got {type(memory).__name__}")
    _check_bool("include_profile", include_profile)
    segs: list[tuple[str, bool]] = []
    if include_profile and memory.profile.strip():
        segs += [(_PROFILE_PREFIX, False), (memory.profile.strip(), True), (_SEPARATOR, False)]
    for i, h in enumerate(memory.history):
        if i:
            segs.append((_SEPARATOR, False))
        segs.append((h.strip(), True))
    return segs


def tokenize_memory(
    memory: Record | UserMemory,
    tokenizer: Any,
    *,
    max_length: int = 512,
    include_profile: bool = True,
) -> list[dict[str, Any]]:
    """Tokenize a user's memory text for next-token prediction, in chunks of ≤ ``max_length``.

    Returns a list of ``{"input_ids", "labels", "user_id"}``; ``labels`` equal
    ``input_ids`` on the user's own content and :data:`IGNORE_INDEX` on the special
    prefix, the ``"Profile: "`` prefix and separators (labels are *not* shifted: Hugging
    Face causal LMs shift them internally).  Long memories become several chunks, each
    starting with the tokenizer's special prefix (e.g. BOS); chunks with no labelled
    token are dropped.

    Example:
        >>> chunks = tokenize_memory(user_memories(records)[0], tok, max_length=256)  # doctest: +SKIP
        >>> chunks[0]["labels"][0]                                                   # doctest: +SKIP
        -100
    """
    _check_tokenizer(tokenizer)
    prefix = _special_prefix(tokenizer)
    _check_max_length(max_length, len(prefix) + 1)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_content in format_memory(memory, include_profile=include_profile):
        seg = _encode(tokenizer, text)
        ids += seg
        labels += seg if is_content else [IGNORE_INDEX] * len(seg)
    body = max_length - len(prefix)
    chunks = []
    for start in range(0, len(ids), body):
        lab = labels[start:start + body]
        if all(x == IGNORE_INDEX for x in lab):
            continue
        chunks.append({"input_ids": prefix + ids[start:start + body],
                       "labels": [IGNORE_INDEX] * len(prefix) + lab,
                       "user_id": memory.user_id})
    return chunks


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(x) for x in out]


def _blank(system_prompt: str | None) -> bool:
    """A system prompt that says nothing (``None``, ``""`` or whitespace only): no system message."""
    return not system_prompt or not system_prompt.strip()


def _messages(query: str, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [] if system_prompt is None or _blank(system_prompt) else [{"role": "system", "content": system_prompt}]
    return msgs + [{"role": "user", "content": query}]


def _check_prompt_options(system_prompt: Any, use_chat_template: Any) -> None:
    if use_chat_template is not None:
        _check_bool("use_chat_template", use_chat_template)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")


def format_prompt(query: str, tokenizer: Any, *, system_prompt: str | None = None,
                  use_chat_template: bool | None = None) -> str:
    """The generation prompt for ``query`` as text (chat template if the tokenizer has one).

    It is the text of :func:`tokenize_instruction`'s prompt after any BOS (the query stripped); a blank
    ``system_prompt`` (``None``, ``""`` or whitespace) adds no system message.

    Example:
        >>> format_prompt("Is tea healthy?", tok)                  # doctest: +SKIP
        '<|im_start|>system\\n...<|im_start|>user\\nIs tea healthy?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    _check_tokenizer(tokenizer)
    _check_text("query", query)
    _check_prompt_options(system_prompt, use_chat_template)
    chat = _has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat and not _has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    if chat:  # the query stripped, as tokenize_instruction feeds it
        messages = _messages(query.strip(), system_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = _PLAIN_PROMPT.format(query=query.strip())
    return text if system_prompt is None or _blank(system_prompt) else f"{system_prompt.strip()}\n\n{text}"


def _prompt_ids(tokenizer: Any, query: str, system_prompt: str | None, chat: bool) -> list[int]:
    if chat:
        return _chat_ids(tokenizer, _messages(query, system_prompt), True)
    return _special_prefix(tokenizer) + _encode(tokenizer, format_prompt(query, tokenizer, system_prompt=system_prompt,
                                                                         use_chat_template=False))


def tokenize_instruction(
    record: Record,
    tokenizer: Any,
    *,
    max_length: int = 512,
    system_prompt: str | None = None,
    add_response: bool = True,
    use_chat_template: bool | None = None,
) -> dict[str, Any]:
    """Tokenize query → response for instruction tuning (labels on the response only).

    With ``add_response=False`` only the generation prompt is returned (all labels
    :data:`IGNORE_INDEX`), ready for ``model.generate``.  ``use_chat_template=None`` uses
    the tokenizer's chat template when it has one, else the plain
    ``"Question: …\\nAnswer: …"`` template (response followed by EOS).  Truncation to
    ``max_length`` is described in the module docstring.

    Returns ``{"input_ids", "labels", "user_id"}``.

    Example:
        >>> ex = tokenize_instruction(Record("u", "", ["h"], "Is tea ok?", "Yes."), tok)  # doctest: +SKIP
        >>> tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100])  # doctest: +SKIP
        'Yes.<|im_end|>\\n'
    """
    if not isinstance(record, Record):
        raise TypeError(f"record must be a Record, got {type(record).__name__}")
    _check_tokenizer(tokenizer)
    _check_max_length(max_length, 4)
    _check_bool("add_response", add_response)
    _check_prompt_options(system_prompt, use_chat_template)
    chat = _has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat and not _has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    query = record.query.strip()
    prompt = _prompt_ids(tokenizer, query, system_prompt, chat)
    response: list[int] = []
    if add_response:
        if chat:
            full = _chat_ids(tokenizer, _messages(query, system_prompt) +
                             [{"role": "assistant", "content": record.response.strip()}], False)
            if full[:len(prompt)] == prompt and len(full) > len(prompt):
                response = full[len(prompt):]
            else:  # a template whose prompt is not a prefix of the full conversation
                response = _encode(tokenizer, record.response.strip()) + _eos(tokenizer)
        else:
            response = _encode(tokenizer, " " + record.response.strip()) + _eos(tokenizer)
    if len(prompt) + len(response) > max_length:
        budget = max(max_length - len(prompt), min(len(response), max_length // 2))
        response = response[:budget]
        excess = len(prompt) + len(response) - max_length
        q_ids = _encode(tokenizer, query)
        for _ in range(4):
            if excess <= 0 or not q_ids:
                break
            q_ids = q_ids[min(len(q_ids), excess + 1):]
            # a cut inside a multi-byte character decodes to U+FFFD: drop it, keep only the query's own text
            shorter = tokenizer.decode(q_ids, skip_special_tokens=True).lstrip("\ufffd").strip()
            if not shorter:  # no query left: the cut below keeps the prompt's end instead
                break
            prompt = _prompt_ids(tokenizer, shorter, system_prompt, chat)
            excess = len(prompt) + len(response) - max_length
        if excess > 0:  # the template alone is too long: keep the prompt's end
            prompt = prompt[excess:]
    return {"input_ids": prompt + response,
            "labels": [IGNORE_INDEX] * len(prompt) + response,
            "user_id": record.user_id}


def collate(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pad a batch of tokenized examples into tensors, keeping each row's user id.

    Returns ``input_ids`` and ``attention_mask`` (``LongTensor [B, T]``), ``labels``
    (``[B, T]``, padded with :data:`IGNORE_INDEX`; present when every example has
    labels) and ``user_ids`` (``list[str]``, one per row — the multi-user runtime routes
    each row to its user's adapters).  Use ``padding_side="left"`` for generation.

    Example:
        >>> b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "user_id": "a"},
        ...              {"input_ids": [8], "labels": [8], "user_id": "b"}], pad_token_id=0)
        >>> b["input_ids"].tolist(), b["user_ids"]
        ([[5, 6, 7], [8, 0, 0]], ['a', 'b'])
    """
    if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or len(examples) == 0:
        raise ValueError("examples must be a non-empty sequence of dicts with 'input_ids'")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r} "
                        "(does the tokenizer have a pad or eos token?)")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    multiple = pad_to_multiple_of
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    has_labels = ["labels" in ex for ex in examples]
    if any(has_labels) and not all(has_labels):
        raise ValueError("examples: either every example has 'labels' or none has")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise ValueError(f"examples[{i}] must be a dict with 'input_ids'")
        if len(ex["input_ids"]) == 0:
            raise ValueError(f"examples[{i}]['input_ids'] is empty")
        if all(has_labels) and len(ex["labels"]) != len(ex["input_ids"]):
            raise ValueError(f"examples[{i}]: 'labels' has {len(ex['labels'])} tokens, "
                             f"'input_ids' {len(ex['input_ids'])}")
    width = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    bsz = len(examples)
    input_ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long) if all(has_labels) else None
    def ids_of(i: int, key: str) -> torch.Tensor:
        try:
            t = torch.as_tensor(list(ex[key]))
        except (TypeError, ValueError, RuntimeError):
            t = None
        # a float id would be truncated to another token by the long tensor, a bool taken as 0/1
        if t is None or t.dim() != 1 or t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"examples[{i}][{key!r}] must be a list of int token ids, got {list(ex[key])[:5]!r}")
        return t

    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, sl] = ids_of(i, "input_ids")
        attention[i, sl] = 1
        if labels is not None:
            labels[i, sl] = ids_of(i, "labels")
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    if labels is not None:
        out["labels"] = labels
    out["user_ids"] = [str(ex.get("user_id", "")) for ex in examples]
    return out


class Collator:
    """``collate`` bound to a tokenizer's pad id (falls back to EOS), for ``DataLoader``.

    Example:
        >>> loader = torch.utils.data.DataLoader(examples, batch_size=8, collate_fn=Collator(tok))  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, *, padding_side: Literal["right", "left"] = "right",
                 pad_to_multiple_of: int | None = None) -> None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("tokenizer has neither a pad_token_id nor an eos_token_id; set tokenizer.pad_token")
        self.pad_token_id = int(pad)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_token_id, padding_side=self.padding_side,
                       pad_to_multiple_of=self.pad_to_multiple_of)
