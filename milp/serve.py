"""``python -m milp.serve``: answer many users over HTTP, their concurrent requests in one batch.

A reference server for a finished ``milp.train`` run: the run's model, dtype and shared
instruction adapter, each user with their own memory adapters loaded on demand from the run's
``users/`` (a :class:`~milp.store.UserStore`, least recently used users evicted past the run's
``--slots``), answering as ``python -m milp.answer`` does (greedy, or sampled where a request
asks: see below). Requests of any users are
answered together, as one mixed-user batch through the fused multi-LoRA kernels, by a batcher
thread in one of two ways (``--batching``):

* ``continuous`` (the default where the model allows it, see
  :func:`milp.decode.continuous_unsupported`): up to ``--batch-size`` rows generate at once, one
  token each per step (:class:`milp.decode.ContinuousBatch`). A request that arrives while others
  generate joins them at the next step (its prompt prefilled then), and a row leaves at its end
  (end-of-text token, its ``max_new_tokens``, or cancelled), its place free for the next request.
  When the server is idle, the first request waits at most ``--max-wait-ms`` for others to be
  prefilled with it. Requests join in arrival order: one whose user has no free adapter slot
  (``--slots``) waits, and those behind it too, until a row ends. ``--compile`` gives the batch a
  static key/value cache (``--batch-size`` rows of the longest prompt and answer) and compiles
  its decode step: on a GPU a CUDA graph replayed at every step, whoever joins and leaves (one
  per row bucket and cache width: a step of a few rows runs the cache's first 8 or so, not all of
  them). At start the adapter banks are sized for the run's users (``MilpRuntime.reserve``: a
  user loaded later would otherwise grow a bank and make the step trace again) and every shape is
  compiled (``ContinuousBatch.warm_up``), before the first request is answered.
* ``static``: a batch of up to ``--batch-size`` requests (taken as the first one came, waiting
  at most ``--max-wait-ms`` for more) is answered by one ``generate`` call; requests that arrive
  meanwhile wait for the whole batch to end.

Standard library only (``http.server``); put a real front end (TLS, authentication, rate
limits) before it in production.

    python -m milp.serve runs/milp --port 8000
    curl -s localhost:8000/v1/answer -d '{"user_id": "meddia-d3-0294", "query": "I have a headache."}'

Endpoints:

* ``POST /v1/answer`` with ``{"user_id": str, "query": str, "max_new_tokens": int (optional,
  at most the server's), "stream": bool (optional)}`` → ``{"user_id", "query", "answer"}``.
  A sampled answer instead of the greedy one: ``"temperature"`` (> 0; 0 is greedy), optionally
  ``"top_k"``, ``"top_p"``, ``"min_p"`` (as ``generate`` takes them) and ``"seed"`` (an int; the
  answer then has a ``"seed"`` field, drawn where the request gave none). A request sampled with
  a seed gets the same answer again, whatever else the server generates meanwhile and with
  either batching (:mod:`milp.sampling`: one generator per row, not one per batch).
  ``"stop"``: a string or a list of up to four: the answer ends at the first of them and is the
  text before it (a stream holds back an end that may be the start of one);
  with ``"stream": true`` a ``text/event-stream`` (server-sent events, chunked) instead: one
  ``data: {"delta": str}`` event per piece of the answer as it is generated (the pieces
  concatenate to the answer), then ``data: {"user_id", "query", "answer", "done": true}``, or
  ``data: {"error": str, "status": int}`` where generation fails after the stream began (the
  checks below answer with their status before it begins); ``400`` for a malformed request,
  ``401`` without the server's API key where it has one (``--api-key-env``),
  ``404`` for a user the run does not hold (users added since, by ``python -m milp.add_users``,
  are found), ``500`` when generation fails (for that request alone: the others of its batch are
  answered), ``503`` once the server is closing. The body needs a ``Content-Length`` (``411``
  without one, ``413`` past 1 MiB, ``408`` when fewer bytes come within ``READ_TIMEOUT_S``).
  A request whose client hangs up before its answer (or that gets ``504`` after
  ``REQUEST_TIMEOUT_S``) is cancelled: still queued, it is never generated; being generated,
  its row ends at the next token, and a batch whose rows all ended stops.
* ``POST /v1/chat/completions`` and ``GET /v1/models`` (``/v1/models/<user>``): OpenAI's API, the
  request's ``model`` naming the user (:mod:`milp.openai_api`: what it reads and answers), errors
  in OpenAI's shape.
* ``GET /health`` → ``{"status": "ok", "batching": "continuous" | "static", "requests": …,
  "batches": …, "largest_batch": …, "cancelled": …, "steps": …}`` (:meth:`AnswerServer.stats`;
  ``503`` with ``"status": "closing"`` once the server is closing).
* ``GET /metrics``: Prometheus' text format (open, as ``/health`` is): requests by how they
  ended, prompt and generated tokens, queue time, latency, time to first token and between
  tokens (continuous batching), decode steps, requests running and waiting, the key/value
  cache's bytes (the ``_Metrics`` class lists them; ``501`` where ``prometheus_client`` is not
  installed).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hmac
import json
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from .detok import AnswerText

if TYPE_CHECKING:
    from .data import Record
    from .pipeline import Answer
    from .sampling import Sampling, TokenLogprob

__all__ = ["AnswerServer", "build_parser", "main"]

PROG = "milp.serve"
BATCHING = ("auto", "continuous", "static")
MAX_BODY_BYTES = 1 << 20  # a request larger than this is refused (413)
REQUEST_TIMEOUT_S = 600.0  # a request not answered by then gets 504
# a connection silent this long is closed: an idle keep-alive one, or a body shorter than its
# Content-Length (408), which used to hold its handler thread forever
READ_TIMEOUT_S = 60.0
MAX_STOP = 4  # stop strings a request may give (OpenAI's limit)
POLL_S = 0.25  # how often a handler waiting for its answer looks whether its client hung up


@dataclass
class _Request:
    user: str
    query: str
    max_new_tokens: int
    done: Future = field(default_factory=Future)
    on_delta: Callable[[str], None] | None = None
    sampling: Sampling | None = None  # None: greedy
    stop: tuple[str, ...] = ()  # texts that end the answer (not part of it)
    sent: str = ""  # the answer's text handed to on_delta so far
    prompt_tokens: int = 0  # its prompt's length (continuous batching: known once it joined)
    text: AnswerText | None = None  # continuous batching: its answer's text as its tokens come, where read
    logprobs: int | None = None  # its tokens' logprobs with this many alternatives (None: none)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # continuous batching: so far
    metrics: _Metrics | None = None  # the server's, told how the request ended
    created: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its generation first started
    last_token: float | None = None  # continuous batching: when its last token came
    ended: bool = False  # its end was told to metrics

    def progress(self, text: str) -> None:
        """The answer so far (of this attempt: a batch that failed is answered again one request
        at a time, from the start): what extends the text already handed on goes to ``on_delta``."""
        if (self.on_delta is None or self.done.cancelled() or len(text) <= len(self.sent)
                or not text.startswith(self.sent)):
            return
        delta, self.sent = text[len(self.sent):], text
        try:
            self.on_delta(delta)
        except Exception:  # a failing listener loses the stream, never the batch: the answer still comes
            self.on_delta = None

    def record(self) -> Record:
        """The request as a record whose MiLP prompt is the query alone (as ``milp.answer`` asks)."""
        from .answer import _PLACEHOLDER
        from .data import Record as _Record

        return _Record(self.user, "", [_PLACEHOLDER], self.query, _PLACEHOLDER)

    def finish(self, answer: str | None = None, error: BaseException | None = None) -> None:
        """Settle the future with ``answer`` or ``error``, unless it was cancelled meanwhile."""
        with contextlib.suppress(InvalidStateError):  # cancelled: nobody waits for it
            if error is not None:
                self.done.set_exception(error)
            else:
                self.done.set_result(answer)
        reason = getattr(answer, "finish_reason", "stop") if error is None else (
            "refused" if isinstance(error, _Closing) else "cancelled" if isinstance(error, _ClientLeft) else "error")
        self.end("cancelled" if self.done.cancelled() else reason, answer)

    def end(self, reason: str, answer: Any = None) -> None:
        """Tell the server's metrics, once, how the request ended (an answer's counts with it)."""
        if self.metrics is not None and not self.ended:
            self.ended = True
            self.metrics.ended(self, reason, answer)

    def start(self) -> None:
        """Its generation starts: its time in the queue to the server's metrics (the first time)."""
        if self.started is None:
            self.started = time.perf_counter()
            if self.metrics is not None:
                self.metrics.queue.observe(self.started - self.created)

    def token(self) -> None:
        """Continuous batching: a token of its answer came (its time to first token, or the
        time since its last one, to the server's metrics)."""
        now = time.perf_counter()
        if self.metrics is not None:
            (self.metrics.ttft if self.last_token is None else self.metrics.itl).observe(
                now - (self.created if self.last_token is None else self.last_token))
        self.last_token = now


class _Metrics:
    """The server's Prometheus metrics (``GET /metrics``, in a registry of its own):
    ``milp_requests_finished_total{finish_reason}`` (``stop``, ``length``, ``cancelled``,
    ``error``, ``refused``), ``milp_prompt_tokens_total`` and ``milp_generation_tokens_total`` (of
    the answers given), ``milp_request_queue_time_seconds`` (arrival to generation start),
    ``milp_request_latency_seconds`` (arrival to answer), ``milp_time_to_first_token_seconds`` and
    ``milp_inter_token_latency_seconds`` (continuous batching: each token as it comes),
    ``milp_decode_steps_total``, and the gauges ``milp_requests_running``,
    ``milp_requests_waiting`` and ``milp_kv_cache_bytes`` (continuous batching). ``None`` from
    :meth:`create` without ``prometheus_client``."""

    LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
    TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 cache_bytes: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.finished = Counter("milp_requests_finished", "Requests that ended, by how", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("milp_prompt_tokens", "Prompt tokens of the requests answered", registry=r)
        self.generation_tokens = Counter("milp_generation_tokens", "Tokens generated for the requests answered",
                                         registry=r)
        self.queue = Histogram("milp_request_queue_time_seconds", "From a request's arrival to its generation's start",
                               buckets=self.LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("milp_request_latency_seconds", "From a request's arrival to its answer",
                                 buckets=self.LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("milp_time_to_first_token_seconds",
                              "From a request's arrival to its first token (continuous batching)",
                              buckets=self.LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("milp_inter_token_latency_seconds",
                             "Between two tokens of one answer (continuous batching)", buckets=self.TOKEN_BUCKETS,
                             registry=r)
        self.steps = Counter("milp_decode_steps", "Decode steps run (continuous batching)", registry=r)
        Gauge("milp_requests_running", "Requests being generated", registry=r).set_function(running)
        Gauge("milp_requests_waiting", "Requests queued, not yet generated", registry=r).set_function(waiting)
        Gauge("milp_kv_cache_bytes", "Bytes of the running rows' key/value cache (continuous batching)",
              registry=r).set_function(cache_bytes)

    @classmethod
    def create(cls, running: Callable[[], float], waiting: Callable[[], float],
               cache_bytes: Callable[[], float]) -> _Metrics | None:
        try:
            return cls(running, waiting, cache_bytes)
        except ModuleNotFoundError:  # an install without the dependency (pip --no-deps): no /metrics
            return None

    def ended(self, request: _Request, reason: str, answer: Any) -> None:
        self.finished.labels(finish_reason=reason).inc()
        if answer is not None and reason != "cancelled":
            self.prompt_tokens.inc(getattr(answer, "prompt_tokens", 0))
            self.generation_tokens.inc(getattr(answer, "new_tokens", 0))
            self.latency.observe(time.perf_counter() - request.created)

    def exposition(self) -> tuple[bytes, str]:
        """The text format's body and content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AnswerServer:
    """An HTTP server answering the users of the finished run in ``run`` (see the module doc).

    Args:
        run: output directory of a finished ``python -m milp.train`` run.
        host, port: where to listen (``port=0``: any free port, see :attr:`address`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: requests answered together at most (continuous batching: rows generating at
            once; default: the run's ``--eval-batch-size``).
        max_wait_ms: how long the batcher waits for more requests after the first one (continuous
            batching: after the first one that finds the server idle).
        max_new_tokens: the longest answer (default: the run's ``--max-new-tokens``); a request
            may ask for fewer tokens.
        log: print one line per batch to stderr.
        batching: ``continuous``, ``static`` or ``auto`` (continuous where the model allows it;
            see the module doc): :attr:`batching` says which runs.
        prefill_chunk: continuous batching: the most prompt tokens one step prefills
            (:class:`milp.decode.ContinuousBatch`'s chunked prefill: a long prompt that arrives
            delays the running requests' next token by a chunk's time, not its whole prefill's);
            ``None`` (default): each arriving prompt whole at the next step.
        compile: continuous batching with a static key/value cache (rows for ``batch_size``
            requests of the longest prompt and answer the server takes) and the decode step
            compiled (``ContinuousBatch(compile=True)``: CUDA graphs on a GPU, replayed whoever
            joins and leaves; one graph per row bucket and cache width, all compiled at start, the
            banks sized for the run's users first). On a CPU it only costs the compile time.
        api_key: where given, ``POST /v1/answer`` needs ``Authorization: Bearer <api_key>``
            (``401`` without it); ``GET /health`` stays open for load balancers. Only as safe
            as the connection: without TLS in front, the key travels in clear.

    Example:
        >>> server = AnswerServer("runs/milp", port=0)   # doctest: +SKIP
        >>> server.start(); host, port = server.address  # serves in background threads  # doctest: +SKIP
        >>> server.close()  # doctest: +SKIP
    """

    def __init__(self, run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                 batch_size: int | None = None, max_wait_ms: float = 10.0, max_new_tokens: int | None = None,
                 log: bool = False, api_key: str | None = None, batching: str = "auto",
                 prefill_chunk: int | None = None, compile: bool = False) -> None:
        from .answer import check_run, load_run
        from .decode import continuous_unsupported
        from .store import UserStore

        for name, v, lo in (("port", port, 0), ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                            ("prefill_chunk", prefill_chunk, 1)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo or (name == "port"
                                                                                            and v > 65535)):
                raise ValueError(f"{name} must be an int {'in [0, 65535]' if name == 'port' else '>= 1'}, got {v!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 1e6:
            raise ValueError(f"max_wait_ms must be a number of milliseconds in [0, 1e6), got {max_wait_ms!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {compile!r:.60}")
        if compile and batching == "static":
            raise ValueError("compile needs continuous batching (batching='continuous' or 'auto'); static batching "
                             "compiles through the run's generation config")
        if api_key is not None and (not isinstance(api_key, str) or not re.fullmatch(r"[\x21-\x7e]+", api_key)):
            raise ValueError("api_key must be a non-empty string of printable ASCII without spaces (it goes "
                             "in an Authorization header)")
        self._api_key = api_key
        self.run = Path(run)
        settings = check_run(self.run, PROG)  # before the model loads
        self.batch_size = batch_size or settings["eval_batch_size"]
        self.max_new_tokens = max_new_tokens or settings["max_new_tokens"]
        self.max_wait_s = max_wait_ms / 1000.0
        self.prefill_chunk, self.compile = prefill_chunk, compile
        self.log = log
        # listen before the model loads: a port in use is refused at once, not after the load
        self._httpd = _http_server(host, port, _handler(self))
        self._httpd.daemon_threads = True
        try:
            self.model, self.tokenizer, self.runtime, self.settings = load_run(self.run, device, PROG)
        except BaseException:
            self._httpd.server_close()
            raise
        # the longest row a request makes: its prompt (cut to the run's length, as generate_responses
        # does) and the longest answer
        self._max_prompt = self.settings["max_length"] + 128
        why = continuous_unsupported(self.model, self._max_prompt + self.max_new_tokens)
        if (batching == "continuous" or compile) and why is not None:
            self._httpd.server_close()
            asked = "compile=True" if compile else "batching='continuous'"
            raise ValueError(f"{asked}: the run's model cannot be decoded by continuous batching: {why}")
        #: "continuous" or "static": how the batcher runs (see the module doc); "auto" picks continuous
        #: where the model allows it
        self.batching = "static" if batching == "static" or why is not None else "continuous"
        if batching == "auto" and why is not None and log:
            print(f"{PROG}: static batching: {why}", file=sys.stderr, flush=True)
        self._users = UserStore(self.run / "users")  # the handlers' own (the runtime's is the batcher's)
        self._users_lock = threading.Lock()
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._stop = threading.Event()
        # a request is queued, or refused (503), under this lock, and close() sets _stop under it:
        # none can be queued after close() emptied the queue (it would wait REQUEST_TIMEOUT_S)
        self._submit_lock = threading.Lock()
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "cancelled": 0, "steps": 0}
        self._stats_lock = threading.Lock()
        # requests being generated, taken but waiting to join, the key/value cache's bytes (continuous)
        self._running = self._waiting = self._cache_bytes = 0
        #: the Prometheus metrics of GET /metrics (None without prometheus_client)
        self.metrics = _Metrics.create(lambda: self._running, lambda: self._queue.qsize() + self._waiting,
                                       lambda: self._cache_bytes)
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called (requests get 503, ``/health`` too)."""
        return self._stop.is_set()

    def stats(self) -> dict[str, int]:
        """Requests taken into batches, batches generated (a batch whose requests were all
        cancelled while queued is not counted; continuous batching: groups of requests prefilled
        together), the largest batch taken so far (continuous: the most rows generated at once),
        how many of the requests taken were cancelled before their answer (generated in part, or
        not at all), and decode steps (continuous batching only: 0 with static batching)."""
        with self._stats_lock:
            return dict(self._stats)

    def start(self) -> None:
        """Serve in background threads (the HTTP listener and the batcher)."""
        if self._stop.is_set():
            raise RuntimeError("the server is closed: make a new AnswerServer")
        if self._threads:
            raise RuntimeError("the server is already started")
        batcher = self._continuous if self.batching == "continuous" else self._batcher
        self._threads = [threading.Thread(target=batcher, name="milp-serve-batcher", daemon=True),
                         threading.Thread(target=self._httpd.serve_forever, name="milp-serve-http", daemon=True)]
        for t in self._threads:
            t.start()

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C, or SIGTERM: ``docker stop``, systemd), then close:
        the requests being generated are answered first. A second interrupt while they are stops
        at once, raising ``KeyboardInterrupt`` (their clients get no answer)."""
        requested = threading.Event()
        previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        def interrupted(*_: Any) -> None:
            if requested.is_set():  # the second: stop waiting for the rows being answered
                raise KeyboardInterrupt
            requested.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job starts with it ignored
                previous[sig] = signal.signal(sig, interrupted)
        try:
            self.start()
        except BaseException:  # not started here (already started, closed): Ctrl-C as it was, nothing closed
            restore()
            raise
        try:
            while not (requested.wait(0.2) or self._stop.is_set()):
                pass
            if self.log and requested.is_set():
                print(f"{PROG}: closing: the requests being generated are answered first (interrupt again to "
                      "stop at once)", file=sys.stderr, flush=True)
        finally:
            try:
                self.close()
            finally:
                restore()

    def close(self) -> None:
        """Stop listening, answer the requests already taken, refuse the queued ones (503)."""
        with self._submit_lock:
            if self._stop.is_set():
                return
            self._stop.set()
        # shutdown() waits for serve_forever to end: only where its thread runs (a start() that
        # failed part-way, or a listener that died, left none, and close() hung)
        if any(t.name == "milp-serve-http" and t.is_alive() for t in self._threads):
            self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(timeout=REQUEST_TIMEOUT_S)
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            r.finish(error=_Closing())

    def __enter__(self) -> AnswerServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def authorized(self, header: str | None) -> bool:
        """Whether a request with this ``Authorization`` header may ask (always, without an API key)."""
        if self._api_key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        # compared in constant time: the time taken tells nothing of how much of the key matched
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key.encode())

    def knows(self, user: str) -> bool:
        """Whether the run holds ``user`` (its store is read again on a miss where its folder
        changed: users added since count; a 404 for a user nobody added costs one ``stat``)."""
        with self._users_lock:
            return user in self._users

    def users(self) -> list[str]:
        """The run's users, sorted (its ``users/`` read again: users added since count)."""
        with self._users_lock:
            return sorted(map(str, self._users.users()))

    def submit(self, user: str, query: str, max_new_tokens: int | None = None, *,
               on_delta: Callable[[str], None] | None = None, sampling: Sampling | None = None,
               stop: Sequence[str] = (), logprobs: int | None = None) -> Future:
        """Queue one request; its future gives the answer (a :class:`milp.pipeline.Answer`: its
        text, with its token counts and why it ended). ``on_delta(piece)``, where given, is
        called in the batcher's thread with each new piece of the answer as it is generated (the
        pieces concatenate to the answer; keep it short: a queue's ``put``). ``sampling``: a
        :class:`milp.sampling.Sampling` to sample the answer (give it a ``seed`` to get the same
        answer again, whatever else the server generates meanwhile; see :meth:`Sampling.resolved`);
        ``None``: greedy. ``stop``: texts that end the answer, which is its text before the first
        of them. ``logprobs``: the answer's :attr:`~milp.pipeline.Answer.logprobs` hold each
        token's log-probability with this many alternatives (0 to 20); ``None``: none.

        ``future.cancel()`` withdraws the request at any time before its answer: one still queued
        is never generated, one being generated ends at its next token (the rest of its batch goes
        on; a batch whose requests were all cancelled stops)."""
        from .pipeline import _stops_per_record
        from .sampling import check_logprobs, row_sampler

        if on_delta is not None and not callable(on_delta):
            raise TypeError(f"on_delta must be a callable or None, got {type(on_delta).__name__}")
        row_sampler(sampling)  # a TypeError here, not in the batcher
        stops = _stops_per_record(stop, 1)[0]
        logprobs = check_logprobs(logprobs)
        if sampling is not None:  # one seed for every attempt (a failed static batch answers again one by one)
            sampling = sampling.resolved()
        r = _Request(user, query, max_new_tokens or self.max_new_tokens, on_delta=on_delta, sampling=sampling,
                     stop=stops, logprobs=logprobs, metrics=self.metrics)
        with self._submit_lock:
            if self._stop.is_set():
                raise _Closing()
            self._queue.put(r)
        return r.done

    def _batcher(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            self._gather(batch)
            self._answer(batch)

    def _gather(self, batch: list[_Request] | collections.deque[_Request]) -> None:
        """Add queued requests to ``batch`` (its first one just taken) up to ``batch_size``,
        waiting for them at most ``max_wait_ms``."""
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break

    def _answer(self, batch: list[_Request]) -> None:
        from .pipeline import generate_responses

        t0 = time.perf_counter()
        # one generation for every answer length: a row ends at its own (greedy: the same tokens as alone)
        groups = [batch]
        generated = False
        while groups:
            reqs = [r for r in groups.pop(0) if not r.done.cancelled()]  # withdrawn while queued: not generated
            if not reqs:
                continue
            generated = True
            self._running = len(reqs)
            for r in reqs:
                r.start()

            def progress(i: int, text: str, reqs: list[_Request] = reqs) -> None:
                reqs[i].progress(text)

            def stop(i: int, reqs: list[_Request] = reqs) -> bool:  # withdrawn while generated: its row ends
                return reqs[i].done.cancelled()

            try:
                answers = generate_responses(self.model, self.tokenizer, [r.record() for r in reqs],
                                             runtime=self.runtime, max_new_tokens=[r.max_new_tokens for r in reqs],
                                             batch_size=self.batch_size, max_length=self._max_prompt, progress=False,
                                             stream=progress if any(r.on_delta for r in reqs) else None, stop=stop,
                                             sampling=[r.sampling for r in reqs], stop_strings=[r.stop for r in reqs],
                                             logprobs=[r.logprobs for r in reqs])
            except Exception as e:
                if len(reqs) > 1:  # one bad request (a damaged user, say) must not fail the others: one by one
                    groups[:0] = [[r] for r in reqs]
                    continue
                reqs[0].finish(error=e)  # 500 to its request; the server goes on
                continue
            for r, a in zip(reqs, answers):
                r.progress(a)  # whatever of the answer the stream has not handed on yet
                r.finish(a)
        self._running = 0
        for r in batch:
            if r.done.cancelled():
                r.end("cancelled")
        cancelled = sum(r.done.cancelled() for r in batch)
        with self._stats_lock:
            self._stats["requests"] += len(batch)
            self._stats["batches"] += int(generated)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
            self._stats["cancelled"] += cancelled
        self._log_batch(batch, t0)


    def _continuous(self) -> None:
        """The batcher with continuous batching: requests join the running batch between decode
        steps and leave it at their end (see the module doc)."""
        from .pipeline import _continuous_batch

        batch = _continuous_batch(self.model, self.tokenizer, self.runtime, self.batch_size, self.prefill_chunk,
                                  self._max_prompt + self.max_new_tokens if self.compile else None, self.compile)
        waiting: collections.deque[_Request] = collections.deque()  # taken, not yet joined
        live: dict[int, _Request] = {}  # joined: id(request) -> request
        busy: list[_Request] = []  # the requests of the busy period (rows running without a pause)
        t0 = 0.0
        try:
            if self.compile:  # every shape's graph before the first request: none waits for a compile
                t = time.perf_counter()
                # banks sized for the run's users first: a user loaded later grows no bank and raises
                # no max_rank, either of which would make the compiled step trace again
                configs = self._user_configs()
                if configs:
                    self.runtime.reserve(configs)
                shapes = batch.warm_up()
                if self.log:
                    print(f"{PROG}: decode step compiled for {len(shapes)} shapes (rows x cache width: "
                          f"{', '.join(f'{r}x{w}' for r, w in shapes)}) in {time.perf_counter() - t:.1f} s",
                          file=sys.stderr, flush=True)
            while not (self._stop.is_set() and not live):
                if not live and not waiting:
                    if self._stop.is_set():
                        break
                    try:  # idle: the first request, then up to max_wait for more to join with it
                        waiting.append(self._queue.get(timeout=0.05))
                    except queue.Empty:
                        continue
                    self._gather(waiting)
                    t0 = time.perf_counter()
                elif not self._stop.is_set():
                    with contextlib.suppress(queue.Empty):
                        while len(waiting) < self.batch_size:
                            waiting.append(self._queue.get_nowait())
                if self._stop.is_set():  # closing: the requests running are answered, the others refused
                    while waiting:
                        waiting.popleft().finish(error=_Closing())
                try:
                    self._step(batch, waiting, live, busy)
                except Exception as e:  # not the model's (the batch hands those to their rows): a bug
                    for r in live.values():  # 500 to the rows running; the server goes on with a new batch
                        r.finish(error=e)
                    live.clear()
                    batch.close()
                    self._running = self._cache_bytes = 0
                if not live and busy:
                    self._log_batch(busy, t0)
                    busy.clear()
        except BaseException as e:  # no request may wait forever for a batcher that is gone
            for r in [*live.values(), *waiting]:
                r.finish(error=e)
            raise
        finally:
            batch.close()
        for r in waiting:  # closed while they waited for a place
            r.finish(error=_Closing())

    def _user_configs(self) -> list[Any]:
        """The distinct memory configurations of the run's users (what ``--compile`` sizes the
        banks for). A configuration that cannot be read or does not fit the model is left out:
        its user's requests get the load's error, as without ``--compile``."""
        from .config import MemoryConfig
        from .runtime import CONFIG_FILE

        store, layers = self.runtime.store, self.runtime.state.num_layers
        seen: dict[str, Any] = {}
        for user in store.users():
            path = store.path(user)
            try:
                config = MemoryConfig.from_json(path / CONFIG_FILE) if path is not None else None
                if config is not None:
                    config.check_num_layers(layers)
                    seen.setdefault(config.to_json(), config)
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return list(seen.values())

    def _step(self, batch: Any, waiting: collections.deque[_Request], live: dict[int, _Request],
              busy: list[_Request]) -> None:
        """Let the cancelled requests go, the waiting ones join while there is room, and run one step."""
        from .pipeline import _instruction_examples, _row_answer

        taken = cancelled = joined = 0
        for key, r in list(live.items()):
            if r.done.cancelled():  # withdrawn while generated: its row leaves
                batch.leave(key)
                del live[key]
                cancelled += 1
                r.end("cancelled")
        while waiting and batch.can_join(waiting[0].user):  # in arrival order: none overtakes a waiting one
            r = waiting.popleft()
            taken += 1
            if r.done.cancelled():  # withdrawn while queued: never generated
                busy.append(r)
                cancelled += 1
                r.end("cancelled")
                continue
            try:
                prompt = _instruction_examples([r.record()], self.tokenizer, None, self._max_prompt,
                                               add_response=False)[0]["input_ids"]
                batch.join(id(r), prompt, r.max_new_tokens, r.user, sampling=r.sampling, logprobs=r.logprobs)
                r.prompt_tokens = len(prompt)
                if r.stop or r.on_delta is not None:  # its text is read: decoded as its tokens come
                    r.text = AnswerText(self.tokenizer, r.stop)
            except Exception as e:  # an unknown user (removed since its check), say: 500 to this one alone
                r.finish(error=e)
                continue
            live[id(r)] = r
            busy.append(r)
            joined += 1
            r.start()
        self._running, self._waiting = len(live), len(waiting)
        with self._stats_lock:
            self._stats["requests"] += taken
            self._stats["cancelled"] += cancelled
            self._stats["batches"] += int(joined > 0)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(live))
            self._stats["steps"] += int(bool(live))
        if not live:
            return
        updates = batch.step()
        if self.metrics is not None:
            self.metrics.steps.inc()
        for u in updates:
            r = live[cast(int, u.key)]
            if u.error is not None:
                r.finish(error=u.error)
                del live[cast(int, u.key)]
                continue
            r.token()
            if u.logprob is not None:
                r.token_logprobs.append(u.logprob)
            # a stop string: the row leaves with it
            answer = _row_answer(batch, self.tokenizer, u, r.text, limit=r.max_new_tokens,
                                 prompt_tokens=r.prompt_tokens)
            if answer is None:
                if r.on_delta is not None and r.text is not None:
                    r.progress(r.text.partial())
                continue
            if r.logprobs is not None:
                answer.logprobs = tuple(r.token_logprobs[:answer.new_tokens])
            r.progress(answer)
            r.finish(answer)
            del live[cast(int, u.key)]
        self._running = len(live)
        self._cache_bytes = batch.cache_bytes if self.metrics is not None else 0  # read by /metrics only

    def _log_batch(self, reqs: list[_Request], t0: float) -> None:
        """Where ``log``: one line for the requests of a batch (continuous batching: of a busy
        period, the rows running without a pause) that began at ``t0``."""
        if self.log:
            cancelled = sum(r.done.cancelled() for r in reqs)
            users = len({r.user for r in reqs})
            print(f"{PROG}: {len(reqs)} requests of {users} users in {time.perf_counter() - t0:.2f} s"
                  + (f" ({cancelled} cancelled)" if cancelled else ""), file=sys.stderr, flush=True)


class _Closing(Exception):
    """The server is closing: the request was not taken."""


class _ClientLeft(Exception):
    """The client hung up before its answer: the request was cancelled."""


def _handler(server: AnswerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "milp-serve"
        timeout = READ_TIMEOUT_S  # socket reads: an idle or stalled client does not hold its thread forever
        _chunked = True  # a streamed response's framing (_stream)
        _openai = False  # this request's errors in OpenAI's shape (milp.openai_api)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass  # one line per batch instead (AnswerServer(log=True))

        def _send(self, status: HTTPStatus, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send_body(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                            "application/json; charset=utf-8", headers)

        def _send_body(self, status: HTTPStatus, body: bytes, content_type: str,
                       headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:  # else an HTTP/1.1 client sends its next request into a closed socket
                self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(body)
            except ConnectionError:  # the client left: nothing to answer, no traceback
                self.close_connection = True

        def _error(self, status: HTTPStatus, msg: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> None:
            from .openai_api import error_body

            self._send(status, error_body(status, msg, param) if self._openai else {"error": msg}, headers)

        def _models(self, user: str) -> None:
            """``GET /v1/models`` (the run's users) or ``GET /v1/models/<user>``."""
            from urllib.parse import unquote

            from . import openai_api as oa

            if not server.authorized(self.headers.get("Authorization")):
                return self._unauthorized()
            if not user:
                return self._send(HTTPStatus.OK, oa.models(server.users()))
            user = unquote(user)
            if not server.knows(user):
                return self._error(HTTPStatus.NOT_FOUND, f"unknown model {user!r}: the run holds no such user",
                                   param="model")
            self._send(HTTPStatus.OK, oa.model(user))

        def _metrics(self) -> None:
            """``GET /metrics``: the server's Prometheus metrics, in the text format."""
            if server.metrics is None:
                return self._error(HTTPStatus.NOT_IMPLEMENTED, "GET /metrics needs the prometheus_client package "
                                                               "(pip install prometheus_client)")
            self._send_body(HTTPStatus.OK, *server.metrics.exposition())

        def _unauthorized(self) -> None:
            self._error(HTTPStatus.UNAUTHORIZED, "an 'Authorization: Bearer <key>' header with the server's API key is "
                                                 "required", {"WWW-Authenticate": 'Bearer realm="milp.serve"'})

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            from . import openai_api as oa

            path = self.path.split("?")[0]
            self._openai = path == oa.MODELS_PATH or path.startswith(oa.MODELS_PATH + "/")
            if self._openai:
                return self._models(path[len(oa.MODELS_PATH) + 1:])
            if path == "/metrics":  # open, as /health: for a Prometheus scraper
                return self._metrics()
            if path != "/health":
                return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path} (GET /health, "
                                                         f"GET /metrics, GET {oa.MODELS_PATH}, POST /v1/answer, "
                                                         f"POST {oa.CHAT_PATH})")
            if server.closing:  # a load balancer stops sending what would be refused
                return self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "closing", "batching": server.batching,
                                                                   **server.stats()})
            self._send(HTTPStatus.OK, {"status": "ok", "batching": server.batching, **server.stats()})

        def do_POST(self) -> None:  # noqa: N802
            # a response sent before the body is read closes the connection: on a kept-alive one the
            # unread body (or a chunked one) was read as the next request
            from .openai_api import CHAT_PATH

            path = self.path.split("?")[0]
            self._openai = path == CHAT_PATH
            if path not in ("/v1/answer", CHAT_PATH):
                self.close_connection = True
                return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path} (POST /v1/answer, "
                                                         f"POST {CHAT_PATH})")
            if not server.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                return self._unauthorized()
            text = self.headers.get("Content-Length")
            if text is None or "Transfer-Encoding" in self.headers:
                self.close_connection = True
                return self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required (a chunked "
                                                               "body is not read)")
            if not re.fullmatch(r"[0-9]+", text.strip()):
                self.close_connection = True
                return self._error(HTTPStatus.BAD_REQUEST,
                                   f"Content-Length must be a number of bytes, got {text!r:.40}")
            length = int(text)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the request body must be at most {MAX_BODY_BYTES} bytes, got {length}")
            body = bytearray()
            try:  # piece by piece: what came before a stall is kept, and named in the 408
                while len(body) < length and (piece := self.rfile.read1(length - len(body))):
                    body += piece
            except TimeoutError:
                pass
            if len(body) < length:  # the client sent less than it announced, then stalled or hung up
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_TIMEOUT, f"the body ended after {len(body)} of its "
                                                               f"Content-Length {length} bytes")
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return self._error(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object ({e})")
            except RecursionError:  # "[[[[…" within the size limit: the handler died without an answer
                return self._error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object (it is nested too deeply)")
            if self._openai:
                return self._chat(req)
            problem = _check_request(req, server.max_new_tokens)
            if problem:
                return self._error(HTTPStatus.BAD_REQUEST, problem)
            user, query = req["user_id"], req["query"]
            if not server.knows(user):
                return self._error(HTTPStatus.NOT_FOUND, f"unknown user {user!r}: the run holds no such user")
            sampling = _sampling_of(req)
            sampling = sampling.resolved() if sampling is not None else None  # its seed drawn where it names none
            seed = {} if sampling is None else {"seed": sampling.seed}  # in the answer: the request can be repeated
            stop = _stop_list(req.get("stop"))
            if req.get("stream"):
                return self._stream(user, query, req.get("max_new_tokens"), [sampling], stop,
                                    _AnswerEvents(user, query, seed))
            answers = self._answers(user, query, req.get("max_new_tokens"), [sampling], stop)
            if answers is not None:
                self._send(HTTPStatus.OK, {"user_id": user, "query": query, "answer": str(answers[0]), **seed})

        def _chat(self, req: Any) -> None:
            """``POST /v1/chat/completions`` (:mod:`milp.openai_api`)."""
            from . import openai_api as oa

            try:
                r = oa.parse_chat(req, server.max_new_tokens)
            except oa.RequestError as e:
                return self._error(HTTPStatus.BAD_REQUEST, str(e), param=e.param)
            if not server.knows(r.user):
                return self._error(HTTPStatus.NOT_FOUND, f"unknown model {r.user!r}: the run holds no such user "
                                                         f"(GET {oa.MODELS_PATH} lists them)", param="model")
            if r.stream:
                return self._stream(r.user, r.query, r.max_new_tokens, oa.samplings(r), r.stop,
                                    _ChatEvents(r, server.tokenizer), r.logprobs)
            answers = self._answers(r.user, r.query, r.max_new_tokens, oa.samplings(r), r.stop, r.logprobs)
            if answers is not None:
                self._send(HTTPStatus.OK, oa.completion(r, answers, server.tokenizer))

        def _submit(self, user: str, query: str, max_new_tokens: int | None, samplings: list[Sampling | None],
                    stop: list[str], logprobs: int | None,
                    on_delta: Callable[[int, str], None] | None = None) -> list[Future]:
            """One request per choice (``samplings``: how each samples); ``on_delta(choice, piece)``.
            Where one cannot be queued (``_Closing``), those queued are withdrawn."""
            dones: list[Future] = []
            try:
                for j, sampling in enumerate(samplings):
                    dones.append(server.submit(user, query, max_new_tokens, sampling=sampling, stop=stop,
                                               logprobs=logprobs,
                                               on_delta=functools.partial(on_delta, j) if on_delta else None))
            except BaseException:
                for done in dones:
                    done.cancel()
                raise
            return dones

        def _answers(self, user: str, query: str, max_new_tokens: int | None, samplings: list[Sampling | None],
                     stop: list[str], logprobs: int | None = None) -> list[Answer] | None:
            """The request's answers (one per choice), waited for; ``None`` where an error was sent
            instead (or the client left)."""
            dones: list[Future] = []
            try:
                dones = self._submit(user, query, max_new_tokens, samplings, stop, logprobs)
                deadline = time.monotonic() + REQUEST_TIMEOUT_S
                return [cast("Answer", self._wait(dones, functools.partial(d.result, timeout=POLL_S), deadline))
                        for d in dones]
            except _Closing:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is closing")
            except _ClientLeft:
                self.close_connection = True
            except TimeoutError:
                self._error(HTTPStatus.GATEWAY_TIMEOUT, f"no answer within {REQUEST_TIMEOUT_S:.0f} s")
            except Exception as e:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(e).__name__}: {e}")
            for done in dones:  # a choice that failed: the others are not waited for
                done.cancel()
            return None

        def _wait(self, dones: list[Future], get: Callable[[], Any], deadline: float) -> Any:
            """What ``get()`` gives (it waits at most ``POLL_S``, raising ``TimeoutError`` or
            ``queue.Empty`` when nothing came), asked again while the client is there and the
            ``deadline`` (``time.monotonic()``) has not passed; the requests ``dones`` are
            cancelled when the client left (``_ClientLeft``) or the time is up (``TimeoutError``)."""
            while time.monotonic() < deadline:
                try:
                    return get()
                except (TimeoutError, queue.Empty):
                    if self._client_left():
                        for done in dones:
                            done.cancel()
                        raise _ClientLeft from None
            for done in dones:
                done.cancel()
            raise TimeoutError

        def _client_left(self) -> bool:
            """Whether the client hung up (its end of the connection reads as closed). A client
            that only shut down its sending half counts as gone too, as in most servers."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):  # reset, or closed under us
                return True

        def _stream(self, user: str, query: str, max_new_tokens: int | None, samplings: list[Sampling | None],
                    stop: list[str], events: _AnswerEvents | _ChatEvents, logprobs: int | None = None) -> None:
            """The answers (one per choice: ``samplings``) as server-sent events (``events`` gives
            their shape), each an HTTP chunk (the connection stays open)."""
            pieces: queue.Queue[tuple[int, str | None]] = queue.Queue()
            try:
                dones = self._submit(user, query, max_new_tokens, samplings, stop, logprobs,
                                     on_delta=lambda j, piece: pieces.put((j, piece)))
            except _Closing:
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is closing")
            for j, done in enumerate(dones):  # after a choice's last piece: the same thread
                done.add_done_callback(functools.partial(_put_end, pieces, j))
            # an HTTP/1.0 client knows no chunks: the events as they are, the end of the stream closing it
            self._chunked = self.request_version != "HTTP/1.0"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")  # a proxy (nginx) in front passes each event on at once
            if self._chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            deadline = time.monotonic() + REQUEST_TIMEOUT_S  # for the whole answer, not each piece
            answers: dict[int, Answer] = {}

            def gone() -> None:  # the client left: the rows end at their next token
                for done in dones:
                    done.cancel()

            first = events.start(len(dones))  # OpenAI's: the role, before any text
            if first and not self._chunk(first):
                return gone()
            while True:
                try:
                    j, piece = self._wait(dones, lambda: pieces.get(timeout=POLL_S), deadline)
                except _ClientLeft:
                    self.close_connection = True
                    return
                except TimeoutError:
                    final = events.error(f"no answer within {REQUEST_TIMEOUT_S:.0f} s", HTTPStatus.GATEWAY_TIMEOUT)
                    break
                if piece is not None:
                    if not self._chunk(events.delta(piece, j)):
                        return gone()
                    continue
                try:
                    answers[j] = dones[j].result(timeout=0)
                except _Closing:
                    final = events.error("the server is closing", HTTPStatus.SERVICE_UNAVAILABLE)
                    gone()
                    break
                except Exception as e:
                    final = events.error(f"generation failed: {type(e).__name__}: {e}",
                                         HTTPStatus.INTERNAL_SERVER_ERROR)
                    gone()  # the other choices are not waited for
                    break
                ended = events.finished(answers[j], j)
                if len(answers) == len(dones):
                    final = ended + events.done([answers[k] for k in range(len(dones))])
                    break
                if not self._chunk(ended):
                    return gone()
            if self._chunk(final):
                self._chunk(b"")  # the last chunk: the response ends, the connection may carry the next

        def _chunk(self, data: bytes) -> bool:
            """One chunk of a chunked response (``b""``: the last), or the bytes alone to an
            HTTP/1.0 client; ``False`` once the client left."""
            try:
                if self._chunked:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
                elif data:
                    self.wfile.write(data)
                self.wfile.flush()
            except (ConnectionError, TimeoutError):
                self.close_connection = True
                return False
            return True

    return Handler


def _put_end(pieces: queue.Queue[tuple[int, str | None]], j: int, _: Future) -> None:
    """Choice ``j``'s request is settled: its stream's end mark."""
    pieces.put((j, None))


def _event(obj: dict[str, Any]) -> bytes:
    """One server-sent event whose data is ``obj`` as JSON (one line: JSON escapes newlines)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _AnswerEvents:
    """The events of a streamed ``/v1/answer`` (one choice): ``{"delta"}`` pieces, then the answer
    with ``"done": true`` or ``{"error", "status"}``."""

    def __init__(self, user: str, query: str, seed: dict[str, Any]) -> None:
        self.head = {"user_id": user, "query": query}
        self.seed = seed

    def start(self, n: int) -> bytes:
        return b""

    def delta(self, piece: str, index: int) -> bytes:
        return _event({"delta": piece})

    def finished(self, answer: Answer, index: int) -> bytes:
        return b""

    def done(self, answers: list[Answer]) -> bytes:
        return _event({**self.head, "answer": str(answers[0]), "done": True, **self.seed})

    def error(self, msg: str, status: HTTPStatus) -> bytes:
        return _event({"error": msg, "status": int(status)})


class _ChatEvents:
    """The events of a streamed ``/v1/chat/completions`` (:mod:`milp.openai_api`): OpenAI's
    chunks (each choice's role, its text as it comes, its finish reason with its logprobs where
    asked for), then the usage where asked for, then ``[DONE]``."""

    def __init__(self, request: Any, tokenizer: Any) -> None:
        self.r, self.tokenizer = request, tokenizer

    def start(self, n: int) -> bytes:
        from .openai_api import chunk

        return b"".join(_event(chunk(self.r, {"role": "assistant", "content": ""}, index=j)) for j in range(n))

    def delta(self, piece: str, index: int) -> bytes:
        from .openai_api import chunk

        return _event(chunk(self.r, {"content": piece}, index=index))

    def finished(self, answer: Answer, index: int) -> bytes:
        from .openai_api import chunk

        return _event(chunk(self.r, {}, answer.finish_reason, answer, self.tokenizer, index=index))

    def done(self, answers: list[Answer]) -> bytes:
        from .openai_api import usage_chunk

        return (_event(usage_chunk(self.r, answers)) if self.r.include_usage else b"") + b"data: [DONE]\n\n"

    def error(self, msg: str, status: HTTPStatus) -> bytes:
        from .openai_api import error_body

        return _event(error_body(status, msg)) + b"data: [DONE]\n\n"


def _check_request(req: Any, max_new_tokens: int) -> str | None:
    """What is wrong with a decoded ``/v1/answer`` body (``None``: nothing)."""
    if not isinstance(req, dict):
        return f"the body must be a JSON object, got {type(req).__name__}"
    for key in ("user_id", "query"):
        v = req.get(key)
        if not isinstance(v, str) or not v.strip():
            return f"{key!r} must be a non-empty string, got {v!r:.80}"
        if problem := _unicode_problem(key, v):
            return problem
    if problem := _count_problem("max_new_tokens", req.get("max_new_tokens"), max_new_tokens):
        return problem
    if not isinstance(req.get("stream", False), bool):
        return f"'stream' must be true or false, got {req['stream']!r:.40}"
    unknown = sorted(set(req) - {"user_id", "query", "max_new_tokens", "stream", "stop", "temperature", *_SAMPLING})
    if unknown:
        return (f"unknown fields {unknown}: expected user_id, query and optionally max_new_tokens, stream, stop, "
                f"temperature, {', '.join(_SAMPLING)}")
    if problem := _stop_problem(req.get("stop")):
        return problem
    try:
        _sampling_of(req)
    except ValueError as e:
        return str(e)
    return None


def _unicode_problem(name: str, text: str) -> str | None:
    """A lone surrogate in field ``name``'s ``text`` (JSON escapes make them: "\\ud83d" cut from
    a pair; not text, not encodable), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{name!r} must be valid Unicode text, got a lone surrogate U+{ord(text[e.start]):04X} "
                f"at character {e.start}")
    return None


def _count_problem(name: str, n: Any, limit: int) -> str | None:
    """What is wrong with field ``name``'s token count ``n`` (absent: ``None``; at most ``limit``,
    the server's), or ``None``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit):
        return f"{name!r} must be an int in [1, {limit}] (the server's), got {n!r:.40}"
    return None


def _stop_problem(stop: Any) -> str | None:
    """What is wrong with a request's ``"stop"`` (absent: ``None``), or ``None``."""
    if stop is not None and not (isinstance(stop, str) and stop) and not (
            isinstance(stop, list) and 1 <= len(stop) <= MAX_STOP and all(isinstance(t, str) and t for t in stop)):
        return f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} of them, got {stop!r:.60}"
    return None


def _stop_list(stop: str | list[str] | None) -> list[str]:
    """A checked ``"stop"`` as a list of strings."""
    return [stop] if isinstance(stop, str) else list(stop or [])


#: a request's fields that shape a sampled answer, beside ``temperature``
_SAMPLING = ("top_k", "top_p", "min_p", "seed")


def _sampling_of(req: dict[str, Any]) -> Sampling | None:
    """The request's sampling (``None``: greedy, without a
    ``temperature`` or with 0). ``ValueError`` names a field out of range, or one that needs a
    ``temperature``."""
    from .sampling import Sampling

    given = [k for k in _SAMPLING if k in req]
    if "temperature" not in req:
        if given:
            raise ValueError(f"{given[0]!r} shapes a sampled answer: give a 'temperature' > 0 too (without one "
                             "the answer is greedy)")
        return None
    if any(req[k] is None for k in ("temperature", *given)):
        raise ValueError(f"{next(k for k in ('temperature', *given) if req[k] is None)!r} must not be null")
    sampling = Sampling(**{k: req[k] for k in ("temperature", *given)})
    return None if sampling.greedy else sampling


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                description="Answer the users of a finished milp.train run over HTTP, batching "
                                            "concurrent requests of any users together.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run", metavar="RUN", help="output directory of a finished `python -m milp.train` run")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: a name, an IPv4 or IPv6 address (default: 127.0.0.1; "
                        "0.0.0.0 or :: for every address)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None,
                   help="requests answered together (continuous batching: rows generating at once; default: the "
                        "run's)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long to wait for more requests after the first of a batch (default: 10)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the run's)")
    p.add_argument("--batching", choices=BATCHING, default="auto",
                   help="continuous: requests join and leave the running batch between tokens; static: one "
                        "generate() per batch, later requests wait for it; auto (default): continuous where the "
                        "model allows it")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="continuous batching: prefill arriving prompts at most TOKENS tokens a step, between the "
                        "running requests' tokens (chunked prefill: a long prompt delays their next token by a "
                        "chunk's time, not its whole prefill's; default: each prompt whole)")
    p.add_argument("--compile", action="store_true",
                   help="continuous batching: a static key/value cache and the decode step compiled (CUDA graphs on a "
                        "GPU: no host work per layer; one graph per row bucket and cache width, all compiled at "
                        "start; on a CPU it only costs the compile time)")
    p.add_argument("--quiet", action="store_true", help="no line per batch on stderr")
    p.add_argument("--api-key-env", metavar="NAME", default=None,
                   help="require 'Authorization: Bearer <key>' on POST /v1/answer, the key read from environment "
                        "variable NAME (not a flag: a process list shows flags to every user of the machine)")
    return p


def _http_server(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threading HTTP server on ``host`` (a name, an IPv4 or an IPv6 address: ``::`` listens on
    every address of both families where the system allows) and ``port``."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a host name or address (0.0.0.0 or :: for every address), got {host!r}")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]

    class Server(ThreadingHTTPServer):
        address_family = family
        # connections waiting for accept(): socketserver's 5 overflowed under a burst of clients
        # (20 at once on a loaded machine: some were reset before their request was read)
        request_queue_size = socket.SOMAXCONN

        def server_bind(self) -> None:
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                with contextlib.suppress(OSError):  # "::" takes IPv4 clients too, as in http.server
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    address = cast("tuple[str, int] | tuple[str, int, int, int]", addr)  # an IPv4 / IPv6 address (AF_INET[6])
    return Server(address[:2] if family == socket.AF_INET else address, handler)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"{PROG}: --api-key-env {args.api_key_env}: that environment variable is not set "
                             f"(or empty)")
    try:
        server = AnswerServer(args.run, host=args.host, port=args.port, device=args.device,
                              batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                              max_new_tokens=args.max_new_tokens, log=not args.quiet, api_key=api_key,
                              batching=args.batching, prefill_chunk=args.prefill_chunk, compile=args.compile)
    except ValueError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    except OSError as e:  # the port is taken, the address is not this machine's
        raise SystemExit(f"{PROG}: cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.address
    print(f"{PROG}: serving {args.run} on {_url(host, port)} (POST /v1/answer, GET /health, GET /metrics); "
          "Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # a second interrupt while closing
        print(f"{PROG}: stopped without answering the requests being generated", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
