"""OpenAI-compatible chat completions for :mod:`milp.serve`: the request and response shapes.

``python -m milp.serve`` answers ``POST /v1/chat/completions`` and ``GET /v1/models`` beside its
own ``POST /v1/answer``, so OpenAI's client libraries (and tools built on them) talk to it as
they talk to vLLM serving LoRA adapters: the request's ``model`` names the **user** (one of the
run's, as ``GET /v1/models`` lists them), whose memory adapters answer it.

    from openai import OpenAI

    client = OpenAI(base_url="http://localhost:8000/v1", api_key="-")
    r = client.chat.completions.create(model="meddia-d3-0294",
                                       messages=[{"role": "user", "content": "I have a headache."}])
    r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

What a MiLP model answers is one query of its user, with the run's own prompt (its system
prompt, its chat template): ``messages`` must be one message of role ``user`` (its ``content``
a string or a list of text parts). A system message or an earlier turn is refused (``400``)
rather than silently dropped: the instruction tuning never saw one.

Fields read: ``model``, ``messages``, ``max_completion_tokens`` (or ``max_tokens``; at most the
server's ``--max-new-tokens``, its default), ``temperature``, ``top_p``, ``seed``, ``stop`` (a
string or up to four), ``stream``, ``stream_options.include_usage``, and as vLLM does ``top_k``
and ``min_p``. Without a ``temperature`` the answer is greedy (the answers the run was evaluated
with, as vLLM takes a model's own defaults; OpenAI's default is 1.0): give one to sample, and
``seed`` to get the same answer again (a sampled answer names its seed, drawn where the request
gave none, in a ``seed`` field beside OpenAI's). ``logprobs: true`` (and ``top_logprobs``, 0 to
20) gives each token of the answer's text its log-probability under the model (before
temperature and filters, as vLLM reports them), its text and bytes, and the most likely tokens at
its place (:func:`logprobs`). ``n`` (up to 16) asks for that many choices of a sampled answer:
choice ``j`` is the answer the request's seed + ``j`` gives alone (:func:`samplings`), each a row
of its own beside the server's other requests (with continuous batching, choices that join
together share one prefill of the prompt); a greedy ``n`` > 1 is refused (its choices would be
one answer). Accepted at their no-op values only: ``presence_penalty`` and
``frequency_penalty`` (0); ``user`` (OpenAI's end-user tag) is ignored. Any other field is
refused by name.

The answer: a ``chat.completion`` whose ``finish_reason`` is ``"stop"`` (the end-of-text token or
a stop string) or ``"length"`` (``max_completion_tokens`` reached), with ``usage`` (the prompt's
tokens, the tokens generated for every choice, the end-of-text token included). Streamed:
``chat.completion.chunk`` events (each choice's role first, then the text as it comes, then its
``finish_reason``, under its ``index``; with
``stream_options: {"include_usage": true}`` one more with the usage and no choices), then
``data: [DONE]``; asked for, the logprobs of all the answer's tokens come with the chunk of the
``finish_reason``. Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sampling import Sampling

__all__ = ["CHAT_PATH", "MAX_N", "MODELS_PATH", "ChatRequest", "RequestError", "chunk", "completion", "error_body",
           "logprobs", "model", "models", "parse_chat", "samplings", "token_text", "usage", "usage_chunk"]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

# fields a client library sends at these values without being asked: accepted there, refused elsewhere
_NO_OP = {"presence_penalty": (0,), "frequency_penalty": (0,)}
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed")
_READ = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
         "seed", "stop", "stream", "stream_options", "user", "logprobs", "top_logprobs", "n"}
MAX_N = 16  # the most choices one request may ask for


class RequestError(ValueError):
    """A chat completion request milp.serve cannot answer: ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion request asks of the server."""

    user: str  # the request's "model": a user of the run
    query: str
    max_new_tokens: int | None  # None: the server's
    sampling: Sampling | None  # None: greedy (its seed resolved: the reply names it)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # the alternatives each token's logprob lists (None: no logprobs)
    n: int = 1  # choices: sampled, choice j with seed + j
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _text(content: Any) -> str:
    """A message's ``content`` as text: a string, or a list of ``{"type": "text", "text": str}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"the user message's 'content' must be a string or a list of text parts "
                       f"({{'type': 'text', 'text': str}}), got {content!r:.80}", "messages")


def parse_chat(req: Any, max_new_tokens: int) -> ChatRequest:
    """The request a decoded ``/v1/chat/completions`` body makes, checked; :class:`RequestError`
    (naming the field) where it is malformed or asks for what milp.serve does not do.
    ``max_new_tokens``: the server's longest answer."""
    from .serve import _sampling_of, _stop_list, _stop_problem, _unicode_problem

    if not isinstance(req, dict):
        raise RequestError(f"the body must be a JSON object, got {type(req).__name__}")
    unknown = sorted(set(req) - _READ - set(_NO_OP))
    if unknown:
        raise RequestError(f"unsupported fields {unknown}: milp.serve reads {', '.join(sorted(_READ))}, and "
                           f"{', '.join(sorted(_NO_OP))} at their defaults", unknown[0])
    for k, allowed in _NO_OP.items():
        if k in req and req[k] is not None and (isinstance(req[k], bool) != isinstance(allowed[0], bool)
                                                or req[k] not in allowed):
            raise RequestError(f"{k!r} must be {json.dumps(allowed[0])} (or absent) here, got {req[k]!r:.40}", k)
    user = req.get("model")
    if not isinstance(user, str) or not user.strip():
        raise RequestError(f"'model' must name a user of the run (GET /v1/models lists them), got {user!r:.80}",
                           "model")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise RequestError(f"'messages' must be a non-empty list of message objects, got {msgs!r:.80}", "messages")
    roles = [m.get("role") for m in msgs]
    if roles != ["user"]:
        raise RequestError(f"'messages' must be one message of role 'user', the user's query (a MiLP model answers "
                           f"one query with the run's own prompt; got roles {roles})", "messages")
    query = _text(msgs[0].get("content"))
    if not query.strip():
        raise RequestError("the user message's 'content' must not be empty", "messages")
    for name, text in (("model", user), ("messages", query)):
        if problem := _unicode_problem(name, text):
            raise RequestError(problem, name)
    n = _max_tokens(req, max_new_tokens)
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r:.40}", "stream")
    opts = req.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise RequestError("'stream_options' is only for a streamed request ('stream': true)", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
                opts.get("include_usage", False), bool):
            raise RequestError(f"'stream_options' must be {{'include_usage': bool}}, got {opts!r:.60}",
                               "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    if req.get("user") is not None and not isinstance(req["user"], str):
        raise RequestError(f"'user' must be a string, got {req['user']!r:.40}", "user")
    if problem := _stop_problem(req.get("stop")):
        raise RequestError(problem, "stop")
    logprobs = _logprobs(req)
    try:
        sampling = _sampling_of({k: v for k, v in req.items() if k in _SAMPLING_FIELDS})
    except (ValueError, TypeError) as e:
        raise RequestError(str(e), _field_named(str(e))) from None
    choices = req.get("n")
    if choices is not None and (isinstance(choices, bool) or not isinstance(choices, int)
                                or not 1 <= choices <= MAX_N):
        raise RequestError(f"'n' must be an int in [1, {MAX_N}], got {choices!r:.40}", "n")
    if (choices or 1) > 1 and sampling is None:
        raise RequestError("'n' > 1 needs a 'temperature' > 0: greedy choices would all be the same", "n")
    return ChatRequest(user=user, query=query, max_new_tokens=n,
                       sampling=sampling.resolved() if sampling is not None else None,
                       stop=_stop_list(req.get("stop")), stream=bool(stream),
                       include_usage=include_usage, logprobs=logprobs, n=choices or 1)


def _logprobs(req: dict[str, Any]) -> int | None:
    """``logprobs`` (true: each token's logprob) and ``top_logprobs`` (its alternatives, 0 to 20)
    as the alternatives listed per token, ``None`` where no logprobs are asked for."""
    from .sampling import MAX_TOP_LOGPROBS

    on, top = req.get("logprobs"), req.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise RequestError(f"'logprobs' must be true or false, got {on!r:.40}", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError(f"'top_logprobs' must be an int in [0, {MAX_TOP_LOGPROBS}], got {top!r:.40}",
                           "top_logprobs")
    if top is not None and not on:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if on else None


def _max_tokens(req: dict[str, Any], limit: int) -> int | None:
    given = {k: req[k] for k in ("max_completion_tokens", "max_tokens") if req.get(k) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise RequestError(f"'max_completion_tokens' and 'max_tokens' disagree ({given}): give one",
                           "max_completion_tokens")
    from .serve import _count_problem

    for k, n in given.items():
        if problem := _count_problem(k, n, limit):
            raise RequestError(problem, k)
        return int(n)
    return None


def _field_named(message: str) -> str | None:
    """The request field a sampling error names (the first named in it)."""
    at = {k: message.find(k) for k in _SAMPLING_FIELDS if k in message}
    return min(at, key=lambda k: at[k]) if at else None


def samplings(r: ChatRequest) -> list[Sampling | None]:
    """How each of ``r``'s choices samples: choice ``j`` with the request's seed + ``j`` (each
    the answer that seed gives alone)."""
    from dataclasses import replace

    from .sampling import MAX_SEED

    if r.sampling is None:
        return [None] * r.n
    seed = r.sampling.seed or 0
    return [replace(r.sampling, seed=(seed + j) % (MAX_SEED + 1)) for j in range(r.n)]


def usage(answers: Sequence[Any]) -> dict[str, int]:
    """OpenAI's ``usage`` of the answers (:class:`milp.pipeline.Answer`) of one request's choices:
    its prompt once, the tokens generated for all of them."""
    prompt, new = answers[0].prompt_tokens, sum(a.new_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _seed(r: ChatRequest) -> dict[str, Any]:
    return {} if r.sampling is None else {"seed": r.sampling.seed}


def completion(r: ChatRequest, answers: Sequence[Any], tokenizer: Any = None) -> dict[str, Any]:
    """The ``chat.completion`` answering ``r`` with ``answers``, one :class:`milp.pipeline.Answer`
    per choice (their logprobs named with ``tokenizer``'s tokens where ``r`` asked for them)."""
    return {"id": r.id, "object": "chat.completion", "created": r.created, "model": r.user,
            "choices": [{"index": j, "message": {"role": "assistant", "content": str(a)},
                         "logprobs": logprobs(r, a, tokenizer), "finish_reason": a.finish_reason}
                        for j, a in enumerate(answers)],
            "usage": usage(answers), **_seed(r)}


def chunk(r: ChatRequest, delta: dict[str, str], finish_reason: str | None = None, answer: Any = None,
          tokenizer: Any = None, index: int = 0) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a streamed answer to ``r`` (of its choice ``index``); a
    choice's last one (with its ``finish_reason``) carries the ``answer``'s logprobs where ``r``
    asked for them."""
    out: dict[str, Any] = {"id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.user,
                           "choices": [{"index": index, "delta": delta, "logprobs": logprobs(r, answer, tokenizer),
                                        "finish_reason": finish_reason}], **_seed(r)}
    if r.include_usage:
        out["usage"] = None
    return out


def logprobs(r: ChatRequest, answer: Any, tokenizer: Any) -> dict[str, Any] | None:
    """OpenAI's ``logprobs`` of a choice: ``{"content": [...]}``, one entry per token of the
    answer's text (special tokens, the end-of-text one among them, left out), each with its
    ``token`` (its text), ``logprob``, ``bytes`` and ``top_logprobs`` (the most likely tokens at
    its place, as many as asked). ``None`` where ``r`` asked for none (or there is no answer)."""
    lps = getattr(answer, "logprobs", None)
    if r.logprobs is None or lps is None:
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top]}
                        for e in lps if e.token not in special], "refusal": None}


def token_text(tokenizer: Any, token: int) -> tuple[str, bytes]:
    """A token's text, and its bytes: the bytes it stands for in the answer's UTF-8 text where
    the tokenizer says (a byte-level BPE's symbols, a byte-fallback ``<0x..>`` token), so that
    the bytes of consecutive tokens make up a character split across them; else its text's."""
    text = str(tokenizer.decode([token], skip_special_tokens=False))
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            with contextlib.suppress(ValueError):
                return text, bytes([int(piece[3:5], 16)])
        table = _unicode_to_byte()
        if _byte_level(tokenizer) and all(c in table for c in piece):
            return text, bytes(table[c] for c in piece)
    return text, text.encode("utf-8")


def _byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` decodes with a byte-level decoder (GPT-2's symbols for bytes)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The bytes of GPT-2's byte-level BPE symbols (transformers' table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def usage_chunk(r: ChatRequest, answers: Sequence[Any]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    return {"id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.user, "choices": [],
            "usage": usage(answers), **_seed(r)}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an HTTP ``status``."""
    code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def models(users: list[Any]) -> dict[str, Any]:
    """``GET /v1/models``: the run's users, each a model of OpenAI's list."""
    return {"object": "list", "data": [model(u) for u in sorted(map(str, users))]}


def model(user: str) -> dict[str, Any]:
    return {"id": user, "object": "model", "created": 0, "owned_by": "milp"}
