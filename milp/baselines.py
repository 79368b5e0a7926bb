"""Personalization baselines of the paper: TpLP, MaLP and UeLP, on the same base model and data.

TpLP and MaLP build a *system-prompt text* that the pipeline passes as ``system_prompt=`` to
:func:`milp.data.tokenize_instruction` / :func:`milp.data.format_prompt`; UeLP conditions the
model on a few learned soft-prompt vectors instead of text.

Token budget (TpLP and MaLP)
    ``max_tokens`` bounds the whole returned text, counted by :func:`count_tokens`
    (``tokenizer(text, add_special_tokens=False)``).  Every item (profile, history turn) is
    written on one line, its whitespace collapsed.  Items are added in priority order while
    the *rendered* text still fits; the first item that does not fit ends the context
    (it and every lower-priority item are dropped whole) — except when nothing has been
    added yet, in which case that single overlong item is cut to the budget (its beginning
    kept, followed by ``"…"``).  The final count is verified on the joined text, so the
    bound is exact, not an estimate.  When there is nothing to say (no profile, no history)
    the context is ``""`` (``format_prompt`` then adds no system message).  A ``max_tokens``
    smaller than the layout's fixed text raises ``ValueError``.

TpLP layout (:func:`tplp_context`) — profile first, then the history *most recent first*::

    Here is what you know about the user (most recent first):
    Profile: <profile>
    - <history[-1]>
    - <history[-2]>
    ...

    Priority: the profile, then turns from the most recent backwards, so whole turns are
    dropped from the oldest end.  The ``Profile:`` line is left out when the profile is empty.

MaLP layout (:class:`MemoryRetriever`)::

    Here is what you know about the user:
    Relevant earlier conversation:
    - <long-term item 1 (most similar to the query)>
    - <long-term item 2>
    Recent conversation:
    - <history[-1]>
    - <history[-2]>

    *Short-term memory* = the ``k_short`` most recent history turns (most recent first).
    *Long-term memory* = the ``k_long`` items of the pool — the remaining (older) turns plus
    the profile — with the highest cosine similarity between their embedding and the
    query's, most similar first (ties: the more recent first; the profile counts as the
    oldest and is shown as ``Profile: <profile>``).  History turns are de-duplicated (after
    whitespace collapsing; the most recent copy is kept), so no turn appears twice, and the
    profile leaves the pool when it is contained in a history turn (as in MedDia, where the
    profile is drawn from the first turn).  Budget priority alternates between the two
    parts, starting with the most recent turn: recent 1, long-term 1, recent 2, long-term
    2, …; a part with no included item is left out with its title.  Embeddings are cached
    per text; :meth:`MemoryRetriever.contexts` embeds all missing texts of a batch in one
    ``embedder.encode`` call.

UeLP (:class:`UserEncoder`, :func:`user_vectors`, :func:`prefix_inputs`)
    A user vector (the mean of the unit-norm sentence embeddings of the profile and history
    turns) goes through an MLP to ``num_vectors`` soft-prompt vectors of the LM's hidden size,
    placed in front of the prompt's token embeddings.  *Scaling:* each output vector is
    L2-normalised and multiplied by ``target_norm · exp(g_j)``, with ``g_j`` a learnable
    per-vector log-gain initialised at 0 and ``target_norm`` the mean L2 norm of the LM's
    token-embedding rows (:func:`embedding_norm`, set by :meth:`UserEncoder.from_model`).
    At initialisation every prefix vector therefore has exactly the norm of a typical
    token embedding — the model sees inputs of the scale it was trained on, so
    joint training starts stable — and the encoder can learn to change it.
    :func:`prefix_inputs` puts the prefix *immediately before each row's first real token*
    (after any left padding; before everything for right padding), so one call serves
    training (right padding, ``model(**out)``) and generation (left padding,
    ``model.generate(**out)``, which derives position ids from the attention mask).

Example:
    >>> from milp.baselines import tplp_context
    >>> from milp.data import Record, tokenize_instruction
    >>> r = Record("u1", "runner", ["I run 10 km a day.", "My knee hurts."], "What should I do?", "Rest.")
    >>> print(tplp_context(r, tok, max_tokens=64))                        # doctest: +SKIP
    Here is what you know about the user (most recent first):
    Profile: runner
    - My knee hurts.
    - I run 10 km a day.
    >>> ex = tokenize_instruction(r, tok, system_prompt=tplp_context(r, tok))  # doctest: +SKIP
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milp.config import _check_bool
from milp.data import _PROFILE_PREFIX, IGNORE_INDEX, _check_tokenizer
from milp.losses import check_ids_in_vocab

__all__ = [
    "TPLP_HEADER",
    "MALP_HEADER",
    "MALP_LONG_TITLE",
    "MALP_RECENT_TITLE",
    "ELLIPSIS",
    "count_tokens",
    "tplp_context",
    "MemoryRetriever",
    "embedding_norm",
    "user_vector",
    "user_vectors",
    "UserEncoder",
    "prefix_inputs",
]

TPLP_HEADER = "Here is what you know about the user (most recent first):"
"""First line of every non-empty TpLP context."""
MALP_HEADER = "Here is what you know about the user:"
"""First line of every non-empty MaLP context."""
MALP_LONG_TITLE = "Relevant earlier conversation:"
"""Title of MaLP's long-term (retrieved) part."""
MALP_RECENT_TITLE = "Recent conversation:"
"""Title of MaLP's short-term (most recent turns) part."""
ELLIPSIS = "…"
"""Appended to an item cut to fit the budget."""
_BULLET = "- "


# =========================================================================== checks
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _user_texts(record: Any, arg: str = "record", *, need_query: bool = False) -> tuple[str, list[str], str]:
    """``(profile, history, query)`` of a Record-like object, whitespace-collapsed; clear errors."""
    profile = getattr(record, "profile", None)
    history = getattr(record, "history", None)
    if profile is None or history is None:
        raise TypeError(f"{arg} must be a Record (or have 'profile' and 'history'), got {type(record).__name__}")
    if not isinstance(profile, str):
        raise TypeError(f"{arg}.profile must be a str, got {type(profile).__name__}")
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(f"{arg}.history must be a sequence of str, got {type(history).__name__}")
    for i, item in enumerate(history):
        if not isinstance(item, str):
            raise TypeError(f"{arg}.history[{i}] must be a str, got {type(item).__name__}")
    query = ""
    if need_query:
        given = getattr(record, "query", None)
        if not isinstance(given, str) or not given.strip():
            raise TypeError(f"{arg}.query must be a non-empty str, got {given!r}")
        query = _one_line(given)
    turns = [t for t in (_one_line(h) for h in history) if t]
    return _one_line(profile), turns, query


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_embedder(embedder: Any) -> None:
    if not callable(getattr(embedder, "encode", None)):
        raise TypeError(f"embedder must have an encode(list[str]) -> Tensor[n, dim] method, "
                        f"got {type(embedder).__name__}")


def _encode(embedder: Any, texts: list[str]) -> Tensor:
    out = embedder.encode(texts)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(texts):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"embedder.encode returned {shape} for {len(texts)} texts; expected a Tensor [n, dim]")
    out = out.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(out).all()):  # NaN rows would rank (and average) silently as garbage
        raise ValueError(f"embedder.encode returned NaN or inf embeddings for {len(texts)} texts")
    return out


# =========================================================================== token budget
def count_tokens(text: str, tokenizer: Any) -> int:
    """Number of tokens of ``text`` without special tokens — the measure of every budget here.

    Example:
        >>> count_tokens("", tok)                                          # doctest: +SKIP
        0
    """
    _check_tokenizer(tokenizer)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


@dataclass(frozen=True)
class _Item:
    section: int   # index into the layout's section titles
    lead: str      # "- " or "Profile: " (never cut)
    text: str      # one line of the user's content


def _render(header: str, titles: Sequence[str | None], items: Sequence[_Item]) -> str:
    """Header, then per section (in section order) its title and its items (in the given order)."""
    if not items:
        return ""
    lines = [header]
    for s, title in enumerate(titles):
        part = [it.lead + it.text for it in items if it.section == s]
        if part:
            if title:
                lines.append(title)
            lines.extend(part)
    return "\n".join(lines)


def _cut(text: str, keep: int, tokenizer: Any) -> str:
    # no special tokens were added, so any in ``ids`` are the user's own text ("<s>" typed in a turn): keep them
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:keep]
    head = tokenizer.decode(ids, skip_special_tokens=False).rstrip("\ufffd").rstrip()
    return head + ELLIPSIS


def _fit(header: str, titles: Sequence[str | None], ranked: Sequence[_Item], tokenizer: Any,
         max_tokens: int) -> str:
    """Render the longest priority-prefix of ``ranked`` within ``max_tokens`` (module docstring rules)."""
    chosen: list[_Item] = []
    text = ""
    for item in ranked:
        trial = _render(header, titles, chosen + [item])
        if count_tokens(trial, tokenizer) <= max_tokens:
            chosen.append(item)
            text = trial
            continue
        if chosen:        # whole items dropped from the lowest priority on
            break
        # nothing fits yet: cut this single overlong item (largest token prefix that fits)
        body = item.text
        lo, hi = 0, count_tokens(body, tokenizer)
        best: str | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = _render(header, titles, [_Item(item.section, item.lead, _cut(body, mid, tokenizer))])
            if count_tokens(cand, tokenizer) <= max_tokens:
                best, lo = cand, mid + 1
            else:
                hi = mid - 1
        if best is None:
            need = count_tokens(_render(header, titles, [_Item(item.section, item.lead, ELLIPSIS)]), tokenizer)
            raise ValueError(f"max_tokens={max_tokens} is too small for the layout's fixed text "
                             f"(header, title and one item's lead need {need} tokens with this tokenizer)")
        return best
    return text


# =========================================================================== TpLP
def tplp_context(record: Any, tokenizer: Any, *, max_tokens: int = 256) -> str:
    """TpLP system-prompt text: the user's profile and history, most recent turn first.

    ``record`` is a :class:`milp.data.Record` (or anything with ``profile: str`` and
    ``history: Sequence[str]``, e.g. :class:`milp.data.UserMemory`).  The result has at
    most ``max_tokens`` tokens (:func:`count_tokens`); layout and truncation rules are in the
    module docstring.  Returns ``""`` when the user has neither profile nor history.

    Example:
        >>> r = Record("u1", "runner", ["I run daily.", "My knee hurts."], "Why?", "Rest.")  # doctest: +SKIP
        >>> tplp_context(r, tok).splitlines()[2]                                         # doctest: +SKIP
        '- My knee hurts.'
    """
    _check_tokenizer(tokenizer)
    _check_int("max_tokens", max_tokens, 1)
    profile, turns, _ = _user_texts(record)
    ranked = [_Item(0, _PROFILE_PREFIX, profile)] if profile else []
    ranked += [_Item(0, _BULLET, t) for t in reversed(turns)]
    return _fit(TPLP_HEADER, [None], ranked, tokenizer, max_tokens)


# =========================================================================== MaLP
class MemoryRetriever:
    """MaLP memory: short-term (most recent turns) + long-term (turns retrieved by the query).

    ``embedder`` is anything with ``encode(list[str]) -> Tensor[n, dim]``, e.g.
    :func:`milp.models.load_default_embedder` (all-MiniLM-L6-v2).  Selection, layout and
    budget rules are in the module docstring; the result is deterministic for a
    deterministic embedder.  Embeddings are cached per (whitespace-collapsed) text for
    the retriever's lifetime (:meth:`clear_cache`).

    Example:
        >>> from milp.models import load_default_embedder
        >>> mem = MemoryRetriever(load_default_embedder(), k_long=3, k_short=2)     # doctest: +SKIP
        >>> system = mem.context(record, tok)                                      # doctest: +SKIP
        >>> systems = mem.contexts(records, tok)           # one encode call       # doctest: +SKIP
    """

    def __init__(self, embedder: Any, *, k_long: int = 3, k_short: int = 2, max_tokens: int = 256) -> None:
        _check_embedder(embedder)
        self.embedder = embedder
        self.k_long = _check_int("k_long", k_long, 0)
        self.k_short = _check_int("k_short", k_short, 0)
        self.max_tokens = _check_int("max_tokens", max_tokens, 1)
        self._cache: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (f"MemoryRetriever(k_long={self.k_long}, k_short={self.k_short}, max_tokens={self.max_tokens}, "
                f"cached={len(self._cache)})")

    @property
    def cache_size(self) -> int:
        """Number of texts whose embedding is cached."""
        return len(self._cache)

    def clear_cache(self) -> None:
        """Forget every cached embedding."""
        self._cache.clear()

    def _split(self, record: Any, arg: str) -> tuple[str, list[str], list[tuple[str, str]]]:
        """``(query, short-term turns most recent first, long-term pool as (shown, embedded) texts)``.

        The pool is in recency order (most recent first, the profile last), which breaks ties.
        """
        profile, turns, query = _user_texts(record, arg, need_query=True)
        seen: set[str] = set()
        unique: list[str] = []                   # most recent first, de-duplicated
        for t in reversed(turns):
            if t not in seen:
                seen.add(t)
                unique.append(t)
        short, older = unique[:self.k_short], unique[self.k_short:]
        pool = [(t, t) for t in older]
        if profile and not any(profile in t for t in unique):
            pool.append((_PROFILE_PREFIX + profile, profile))
        return query, short, pool

    def _embed_missing(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = _encode(self.embedder, missing)
            self._cache.update(zip(missing, vectors))

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Cached embeddings ``[len(texts), dim]`` (float32, CPU): the retriever is itself an embedder.

        Texts are keyed whitespace-collapsed; the missing ones go to ``embedder.encode`` in one
        call.  Passing the retriever to :func:`user_vectors` shares its cache with UeLP.

        Example:
            >>> mem.encode(["I run daily."]).shape                                 # doctest: +SKIP
            torch.Size([1, 384])
        """
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        keys = [_one_line(t) for t in texts]
        self._embed_missing(keys)
        if not keys:
            return torch.zeros(0, 0)
        return torch.stack([self._cache[k] for k in keys])

    def retrieve(self, record: Any) -> tuple[list[str], list[str]]:
        """``(long_term, short_term)`` memory texts of ``record`` before budgeting.

        ``long_term`` is most similar first (a retrieved profile as ``"Profile: …"``),
        ``short_term`` most recent first.

        Example:
            >>> long_term, short_term = mem.retrieve(record)                       # doctest: +SKIP
        """
        return self._retrieve_many([record], "record")[0]

    def _retrieve_many(self, records: Sequence[Any], arg: str) -> list[tuple[list[str], list[str]]]:
        parts = [self._split(r, f"{arg}[{i}]" if arg == "records" else arg) for i, r in enumerate(records)]
        self._embed_missing([t for q, _, pool in parts if pool and self.k_long
                             for t in [q] + [e for _, e in pool]])
        out = []
        for query, short, pool in parts:
            long_term: list[str] = []
            if pool and self.k_long:
                q = self._cache[query]
                sims = [float(F.cosine_similarity(q, self._cache[e], dim=0, eps=1e-8)) for _, e in pool]
                order = sorted(range(len(pool)), key=lambda j: (-sims[j], j))
                long_term = [pool[j][0] for j in order[:self.k_long]]
            out.append((long_term, short))
        return out

    def contexts(self, records: Sequence[Any], tokenizer: Any) -> list[str]:
        """MaLP system-prompt texts for ``records``; all missing embeddings in one ``encode`` call.

        Example:
            >>> systems = mem.contexts(test_records, tok)                           # doctest: +SKIP
            >>> len(systems) == len(test_records)                                  # doctest: +SKIP
            True
        """
        _check_tokenizer(tokenizer)
        if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a sequence of Records, got {type(records).__name__}")
        out = []
        for long_term, short in self._retrieve_many(records, "records"):
            ranked: list[_Item] = []
            for i in range(max(len(long_term), len(short))):
                if i < len(short):
                    ranked.append(_Item(1, _BULLET, short[i]))
                if i < len(long_term):
                    ranked.append(_Item(0, _BULLET, long_term[i]))
            out.append(_fit(MALP_HEADER, [MALP_LONG_TITLE, MALP_RECENT_TITLE], ranked, tokenizer, self.max_tokens))
        return out

    def context(self, record: Any, tokenizer: Any) -> str:
        """MaLP system-prompt text for one record (see :meth:`contexts`).

        Example:
            >>> print(mem.context(record, tok))                                    # doctest: +SKIP
            Here is what you know about the user:
            Relevant earlier conversation:
            - I run marathons.
            Recent conversation:
            - My knee hurts.
        """
        if isinstance(record, Sequence) and not isinstance(record, (str, bytes)):
            raise TypeError("record must be one Record; use contexts(records, tokenizer) for a batch")
        _user_texts(record, "record", need_query=True)  # named as this method's argument, not records[0]
        return self.contexts([record], tokenizer)[0]


# =========================================================================== UeLP
def embedding_norm(model: Any) -> float:
    """Mean L2 norm of the rows of ``model``'s input (token) embedding matrix.

    Example:
        >>> import milp
        >>> embedding_norm(milp.tiny_model("llama")) > 0
        True
    """
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get) or not isinstance(getattr(get(), "weight", None), Tensor):
        raise TypeError(f"model must be a Hugging Face model with get_input_embeddings(), got {type(model).__name__}")
    with torch.no_grad():
        return float(get().weight.float().norm(dim=-1).mean())


def user_vectors(records: Sequence[Any], embedder: Any) -> Tensor:
    """User vectors ``[N, dim]``: per record, the mean of the unit-norm embeddings of its
    profile (when non-empty) and history turns; one ``encode`` call for the whole batch.

    A record with no text at all gets a zero vector.  ``embedder`` may be a
    :class:`MemoryRetriever`, whose embedding cache is then reused.

    Example:
        >>> u = user_vectors(records, load_default_embedder())                    # doctest: +SKIP
        >>> u.shape                                                               # doctest: +SKIP
        torch.Size([len(records), 384])
    """
    _check_embedder(embedder)
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence) or len(records) == 0:
        raise ValueError("records must be a non-empty sequence of Records")
    per_record: list[list[str]] = []
    for i, r in enumerate(records):
        profile, turns, _ = _user_texts(r, f"records[{i}]")
        per_record.append(([profile] if profile else []) + turns)
    unique = list(dict.fromkeys(t for texts in per_record for t in texts))
    if not unique:
        raise ValueError("records hold no profile or history text to embed")
    emb = F.normalize(_encode(embedder, unique), dim=-1, eps=1e-12)         # [U, dim]
    index = {t: j for j, t in enumerate(unique)}
    rows = [emb[[index[t] for t in texts]].mean(0) if texts else emb.new_zeros(emb.shape[1])
            for texts in per_record]
    return torch.stack(rows)


def user_vector(record: Any, embedder: Any) -> Tensor:
    """One user's vector ``[dim]`` (see :func:`user_vectors`).

    Example:
        >>> user_vector(record, load_default_embedder()).shape                    # doctest: +SKIP
        torch.Size([384])
    """
    _user_texts(record, "record")  # named as this function's argument, not records[0]
    return user_vectors([record], embedder)[0]


class UserEncoder(nn.Module):
    """UeLP encoder: user vector ``[B, embed_dim]`` → soft prompt ``[B, num_vectors, hidden_size]``.

    ``Linear(embed_dim, mlp_dim) → GELU → Dropout → Linear(mlp_dim, num_vectors·hidden_size)``
    (``mlp_dim`` defaults to ``hidden_size``), then each output vector is L2-normalised and
    scaled by ``target_norm · exp(log_gain[j])`` (``log_gain`` learnable, initialised at 0):
    at initialisation every soft-prompt vector has the norm of a typical token embedding
    when ``target_norm`` comes from the LM (:meth:`from_model` / :meth:`match_embedding_norm`).

    Example:
        >>> import milp, torch
        >>> lm = milp.tiny_model("llama")
        >>> enc = UserEncoder.from_model(lm, embed_dim=384, num_vectors=4)
        >>> enc(torch.randn(2, 384)).shape
        torch.Size([2, 4, 32])
    """

    target_norm: Tensor  # a buffer (registered in __init__)

    def __init__(self, embed_dim: int, hidden_size: int, num_vectors: int = 4, dropout: float = 0.0, *,
                 mlp_dim: int | None = None, target_norm: float = 1.0) -> None:
        super().__init__()
        self.embed_dim = _check_int("embed_dim", embed_dim, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_vectors = _check_int("num_vectors", num_vectors, 1)
        mlp_dim = hidden_size if mlp_dim is None else _check_int("mlp_dim", mlp_dim, 1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.net = nn.Sequential(nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Dropout(float(dropout)),
                                 nn.Linear(mlp_dim, num_vectors * hidden_size))
        self.log_gain = nn.Parameter(torch.zeros(num_vectors))
        self.register_buffer("target_norm", torch.tensor(self._check_norm(target_norm)))

    @staticmethod
    def _check_norm(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"target_norm must be a positive finite number, got {value!r}")
        return float(value)

    @classmethod
    def from_model(cls, model: Any, embed_dim: int = 384, num_vectors: int = 4, dropout: float = 0.0, *,
                   mlp_dim: int | None = None) -> UserEncoder:
        """An encoder sized and scaled for ``model`` (hidden size and :func:`embedding_norm`).

        Example:
            >>> UserEncoder.from_model(milp.tiny_model("llama")).hidden_size        # doctest: +SKIP
            32
        """
        emb = getattr(model, "get_input_embeddings", None)
        if not callable(emb):
            raise TypeError(f"model must be a Hugging Face model with get_input_embeddings(), "
                            f"got {type(model).__name__}")
        enc = cls(embed_dim, int(emb().weight.shape[1]), num_vectors, dropout, mlp_dim=mlp_dim,
                  target_norm=embedding_norm(model))
        return enc.to(emb().weight.device)

    def match_embedding_norm(self, model: Any) -> UserEncoder:
        """Set ``target_norm`` to ``model``'s :func:`embedding_norm`; returns ``self``.

        Example:
            >>> enc = UserEncoder(384, 32).match_embedding_norm(milp.tiny_model("llama"))  # doctest: +SKIP
        """
        self.target_norm.fill_(self._check_norm(embedding_norm(model)))
        return self

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, hidden_size={self.hidden_size}, num_vectors={self.num_vectors}, "
                f"target_norm={float(self.target_norm):.4g}")

    def forward(self, user_vectors: Tensor) -> Tensor:
        """``[B, embed_dim]`` → ``[B, num_vectors, hidden_size]`` in the encoder's dtype.

        Example:
            >>> UserEncoder(8, 16, num_vectors=2)(torch.zeros(3, 8)).shape
            torch.Size([3, 2, 16])
        """
        if not isinstance(user_vectors, Tensor):
            raise TypeError(f"user_vectors must be a Tensor [B, {self.embed_dim}], got {type(user_vectors).__name__}")
        if user_vectors.dim() != 2 or user_vectors.shape[1] != self.embed_dim:
            raise ValueError(f"user_vectors must have shape [B, {self.embed_dim}], got {tuple(user_vectors.shape)}")
        if not user_vectors.is_floating_point():
            raise TypeError(f"user_vectors must be floating point, got {user_vectors.dtype}")
        weight = cast(Tensor, self.net[0].weight)
        out = self.net(user_vectors.to(device=weight.device, dtype=weight.dtype))
        out = out.view(user_vectors.shape[0], self.num_vectors, self.hidden_size)
        scale = self.target_norm * self.log_gain.exp()                       # [num_vectors]
        return F.normalize(out, dim=-1, eps=1e-6) * scale[:, None]


def prefix_inputs(model: Any, input_ids: Tensor, attention_mask: Tensor | None, prefix: Tensor,
                  labels: Tensor | None = None, *, with_position_ids: bool = False) -> dict[str, Tensor]:
    """``inputs_embeds`` with a soft prompt before each row's first real token, for training and generation.

    ``input_ids``/``attention_mask``/``labels``: ``[B, T]`` (``attention_mask=None`` = all
    ones); ``prefix``: ``[B, P, H]`` or ``[P, H]`` (shared by every row), ``H`` the model's
    embedding width.  Returns ``{"inputs_embeds": [B, P+T, H], "attention_mask": [B, P+T]}``
    plus ``"labels"`` (``-100`` on the prefix) when ``labels`` is given and ``"position_ids"``
    (``cumsum(mask) - 1``, 0 on padding) when ``with_position_ids``.  Per row the layout is
    ``[left padding][prefix][tokens][right padding]``: the prefix follows any left padding,
    so ``model.generate(**out)`` on a left-padded batch equals generating each row alone.
    Gradients flow into ``prefix``; the token embeddings use the model's own table.

    Example:
        >>> import milp, torch
        >>> lm = milp.tiny_model("llama")
        >>> ids, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
        >>> out = prefix_inputs(lm, ids, mask, torch.zeros(2, 4, 32))
        >>> out["inputs_embeds"].shape, out["attention_mask"][0].tolist()
        (torch.Size([2, 7, 32]), [0, 1, 1, 1, 1, 1, 1])
        >>> lm.generate(**out, max_new_tokens=2, do_sample=False, pad_token_id=0).shape
        torch.Size([2, 2])
    """
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise TypeError(f"model must be a Hugging Face model with get_input_embeddings(), got {type(model).__name__}")
    table = get()
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer Tensor [B, T], got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    bsz, width = input_ids.shape
    _check_bool("with_position_ids", with_position_ids)
    check_ids_in_vocab(input_ids, int(table.weight.shape[0]))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a Tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask!r}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != input_ids.shape):
        raise ValueError(f"labels must be a Tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    hidden = int(table.weight.shape[1])
    if not isinstance(prefix, Tensor) or not prefix.is_floating_point():
        raise TypeError(f"prefix must be a floating-point Tensor [B, P, {hidden}], got "
                        f"{prefix.dtype if isinstance(prefix, Tensor) else type(prefix).__name__}")
    if prefix.dim() == 2:
        prefix = prefix.unsqueeze(0).expand(bsz, -1, -1)
    if prefix.dim() != 3 or prefix.shape[0] != bsz or prefix.shape[2] != hidden:
        raise ValueError(f"prefix must have shape [{bsz}, P, {hidden}] (or [P, {hidden}]), got {tuple(prefix.shape)}")
    embeds = table(input_ids)                                                    # [B, T, H]
    n_prefix = prefix.shape[1]
    mask = attention_mask.to(input_ids.device)
    first = (mask != 0).int().argmax(dim=1, keepdim=True)                       # [B, 1] first real token
    pos = torch.arange(width + n_prefix, device=input_ids.device).unsqueeze(0)  # [1, T+P]
    in_prefix = (pos >= first) & (pos < first + n_prefix)                       # [B, T+P]
    src = torch.where(pos < first, pos, torch.where(in_prefix, width + pos - first, pos - n_prefix))

    def take(tokens: Tensor, fill: Tensor) -> Tensor:                           # gather along dim 1
        both = torch.cat([tokens, fill], dim=1)
        index = src if both.dim() == 2 else src.unsqueeze(-1).expand(-1, -1, both.shape[-1])
        return both.gather(1, index)

    out = {"inputs_embeds": take(embeds, prefix.to(device=embeds.device, dtype=embeds.dtype)),
           "attention_mask": take(mask, mask.new_ones(bsz, n_prefix))}
    if labels is not None:
        out["labels"] = take(labels.to(input_ids.device), labels.new_full((bsz, n_prefix), IGNORE_INDEX))
    if with_position_ids:
        new_mask = out["attention_mask"].long()
        out["position_ids"] = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
    return out
