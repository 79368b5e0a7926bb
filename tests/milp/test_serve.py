"""``python -m milp.serve``: concurrent requests of several users answered in mixed batches, with
the answers ``milp.answer`` gives; bad requests get their status and a message."""
from __future__ import annotations

import json
import re
import shutil
import threading
import urllib.error
import urllib.request

import pytest

import milp.pipeline
from milp.add_users import add_users
from milp.answer import answer
from milp.data import write_jsonl
from milp.serve import AnswerServer, _url, main
from milp.train import load_records

QUERIES = ["I have had a headache for three days.", "My knee hurts when I run. Is it serious?",
           "Should I take ibuprofen?", "What should I eat when I have a cold?"]


def _post(server: AnswerServer, body, path: str = "/v1/answer", headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.address
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{_url(host, port)}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(server: AnswerServer, path: str) -> tuple[int, dict]:
    host, port = server.address
    try:
        with urllib.request.urlopen(f"{_url(host, port)}{path}", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _users(run) -> list[str]:
    split = json.loads((run / "split.json").read_text())
    return split["test"] + split["train"]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_concurrent_requests_are_batched_and_answered_as_milp_answer_does(answer_run, batching):
    users = _users(answer_run)[:3]
    asks = [(users[i % 3], q) for i, q in enumerate(QUERIES)]
    want = answer(answer_run, asks, progress=False)
    with AnswerServer(answer_run, port=0, batch_size=4, max_wait_ms=2000, batching=batching) as server:
        assert server.batching == batching
        got: dict[int, tuple[int, dict]] = {}

        def ask(i):
            got[i] = _post(server, {"user_id": asks[i][0], "query": asks[i][1]})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = server.stats()
    assert [got[i][0] for i in range(len(asks))] == [200] * 4
    assert [got[i][1]["answer"] for i in range(len(asks))] == want
    assert [got[i][1]["user_id"] for i in range(len(asks))] == [u for u, _ in asks]
    assert stats["requests"] == 4 and stats["cancelled"] == 0
    if batching == "static":  # one batch (generated in two groups: the run has 2 slots for 3 users)
        assert stats["batches"] == 1 and stats["largest_batch"] == 4 and stats["steps"] == 0
    else:  # the rows of 2 users at most run together (2 slots): the third user's join when one ends
        assert 2 <= stats["batches"] <= 4 and 2 <= stats["largest_batch"] <= 3 and stats["steps"] > 0


def test_a_shorter_answer_is_the_start_of_the_longer_one(answer_run):
    user = _users(answer_run)[0]
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        status, full = _post(server, {"user_id": user, "query": QUERIES[0]})
        status1, short = _post(server, {"user_id": user, "query": QUERIES[0], "max_new_tokens": 1})
    assert (status, status1) == (200, 200)
    assert full["answer"] == answer(answer_run, [(user, QUERIES[0])], progress=False)[0]
    assert full["answer"].startswith(short["answer"])


def test_requests_of_different_lengths_are_answered_in_one_generation(answer_run, monkeypatch):
    """Three requests asking for 1, 3 and 2 tokens, taken together: one generation answers them
    all, each with the answer of its own length."""
    u0, u1 = _users(answer_run)[:2]
    asks = [(u0, QUERIES[0], 1), (u1, QUERIES[1], 3), (u0, QUERIES[2], 2)]
    want = [answer(answer_run, [(u, q)], max_new_tokens=n, progress=False)[0] for u, q, n in asks]
    calls, real = [], milp.pipeline.generate_responses

    def counted(*args, **kw):
        calls.append(kw["max_new_tokens"])
        return real(*args, **kw)

    monkeypatch.setattr(milp.pipeline, "generate_responses", counted)
    with AnswerServer(answer_run, port=0, batch_size=3, max_wait_ms=5000, batching="static") as server:
        got: dict[int, tuple[int, dict]] = {}

        def ask(i):
            u, q, n = asks[i]
            got[i] = _post(server, {"user_id": u, "query": q, "max_new_tokens": n})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got[i] for i in range(3)] == [(200, {"user_id": u, "query": q, "answer": a})
                                          for (u, q, _), a in zip(asks, want)]
    assert len(calls) == 1 and sorted(calls[0]) == [1, 2, 3] and server.stats()["batches"] == 1


@pytest.mark.parametrize("body, status, match", [
    (b"{not json", 400, "JSON object"),
    ([1, 2], 400, "JSON object, got list"),
    ({"user_id": "x"}, 400, "'query' must be a non-empty string"),
    ({"user_id": "", "query": "q"}, 400, "'user_id' must be a non-empty string"),
    ({"user_id": "nobody", "query": "q"}, 404, "unknown user 'nobody'"),
    ({"user_id": "u", "query": "q", "max_new_tokens": 0}, 400, "'max_new_tokens' must be an int in"),
    ({"user_id": "u", "query": "q", "max_new_tokens": 10**6}, 400, "'max_new_tokens' must be an int in"),
    ({"user_id": "u", "query": "q", "beam_width": 2}, 400, "unknown fields \\['beam_width'\\]"),
    ({"user_id": "u", "query": "q", "top_p": 0.9}, 400, "'top_p' shapes a sampled answer: give a 'temperature'"),
    ({"user_id": "u", "query": "q", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
    ({"user_id": "u", "query": "q", "temperature": "hot"}, 400, "temperature must be a finite number"),
    ({"user_id": "u", "query": "q", "temperature": None}, 400, "'temperature' must not be null"),
    ({"user_id": "u", "query": "q", "temperature": 1, "top_k": 2.5}, 400, "top_k must be an int >= 0"),
    ({"user_id": "u", "query": "q", "temperature": 1, "top_p": 0}, 400, r"top_p must be a number in \(0, 1\]"),
    ({"user_id": "u", "query": "q", "temperature": 1, "min_p": 2}, 400, r"min_p must be a number in \[0, 1\]"),
    ({"user_id": "u", "query": "q", "temperature": 1, "seed": -3}, 400, "seed must be an int in"),
    ({"user_id": "u", "query": "q", "temperature": 1, "seed": True}, 400, "seed must be an int in"),
])
def test_bad_requests_get_their_status_and_a_message(answer_run, body, status, match):
    if isinstance(body, dict) and body.get("user_id") == "u":
        body = {**body, "user_id": _users(answer_run)[0]}
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        code, out = _post(server, body)
        assert code == status and re.search(match, out["error"]), out
        assert _get(server, "/health")[1]["requests"] == 0  # nothing reached the model


def test_unknown_endpoints_and_health(answer_run):
    with AnswerServer(answer_run, port=0) as server:
        assert _get(server, "/health") == (200, {"status": "ok", "batching": "continuous", "requests": 0,
                                                 "batches": 0, "largest_batch": 0, "cancelled": 0, "steps": 0})
        code, out = _get(server, "/v2/answer")
        assert code == 404 and "GET /health" in out["error"]
        code, out = _post(server, {"user_id": "a", "query": "b"}, path="/answer")
        assert code == 404 and "POST /v1/answer" in out["error"]


def test_a_failed_batch_answers_500_and_the_server_goes_on(answer_run, monkeypatch):
    user = _users(answer_run)[0]
    real, calls = milp.pipeline.generate_responses, []

    def fail_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(milp.pipeline, "generate_responses", fail_once)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching="static") as server:
        code, out = _post(server, {"user_id": user, "query": QUERIES[0]})
        assert code == 500 and "out of memory (simulated)" in out["error"]
        code, out = _post(server, {"user_id": user, "query": QUERIES[0]})
        assert code == 200 and out["answer"]


def test_users_added_while_serving_are_found(answer_run, tmp_path):
    run = shutil.copytree(answer_run, tmp_path / "run")
    held = set(_users(run)) | set(json.loads((run / "split.json").read_text())["val"])
    new = [r for r in load_records(None) if r.user_id not in held][:1]
    with AnswerServer(run, port=0, max_wait_ms=0) as server:
        assert _post(server, {"user_id": new[0].user_id, "query": QUERIES[0]})[0] == 404
        add_users(run, write_jsonl(new, tmp_path / "new.jsonl"), progress=False)
        code, out = _post(server, {"user_id": new[0].user_id, "query": QUERIES[0]})
    assert code == 200 and out["answer"] == answer(run, [(new[0].user_id, QUERIES[0])], progress=False)[0]


def test_bad_settings_are_refused_before_the_model_loads(answer_run, tmp_path):
    for kw, match in ((dict(port=70000), "port must be an int in"), (dict(batch_size=0), "batch_size must be"),
                      (dict(max_wait_ms=-1), "max_wait_ms must be"), (dict(prefill_chunk=0), "prefill_chunk must be")):
        with pytest.raises(ValueError, match=match):
            AnswerServer(answer_run, **kw)
    with pytest.raises(TypeError, match="compile must be a bool, got 'yes'"):
        AnswerServer(answer_run, compile="yes")
    with pytest.raises(ValueError, match="compile needs continuous batching"):
        AnswerServer(answer_run, compile=True, batching="static")
    with pytest.raises(SystemExit, match="milp.serve: .* is not a milp.train output directory"):
        AnswerServer(tmp_path)
    with AnswerServer(answer_run, port=0) as server:  # a port in use, by the CLI
        with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1"):
            main([str(answer_run), "--port", str(server.address[1]), "--quiet"])


def test_an_api_key_guards_the_answers_and_not_the_health(answer_run, monkeypatch):
    user = _users(answer_run)[0]
    body = {"user_id": user, "query": QUERIES[0]}
    with AnswerServer(answer_run, port=0, max_wait_ms=0, api_key="s3cret-key") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"},
                        {"Authorization": "Bearer s3cret-key-and-more"}):
            code, out = _post(server, body, headers=headers)
            assert code == 401 and "Authorization: Bearer" in out["error"], headers
        code, out = _post(server, body, headers={"Authorization": "bearer  s3cret-key "})
        assert code == 200 and out["answer"]
        assert _get(server, "/health")[0] == 200
    for bad in ("", "with space", "é", 7):
        with pytest.raises(ValueError, match="api_key must be a non-empty string of printable ASCII"):
            AnswerServer(answer_run, port=0, api_key=bad)
    monkeypatch.delenv("MILP_TEST_KEY", raising=False)
    with pytest.raises(SystemExit, match="--api-key-env MILP_TEST_KEY: that environment variable is not set"):
        main([str(answer_run), "--api-key-env", "MILP_TEST_KEY", "--port", "0", "--quiet"])


def _ipv6() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6(), reason="this machine has no IPv6 loopback")
def test_it_listens_on_ipv6_and_refuses_an_unknown_host(answer_run):
    """--host ::1 (or ::) used to fail: the server was IPv4 only ("Address family for hostname
    not supported")."""
    user = _users(answer_run)[0]
    with AnswerServer(answer_run, host="::1", port=0, max_wait_ms=0) as server:
        assert server.address[0] == "::1"
        code, out = _post(server, {"user_id": user, "query": QUERIES[0]})
        assert code == 200 and out["answer"]
    with pytest.raises(SystemExit, match="cannot listen on no-such-host.invalid:0"):
        main([str(answer_run), "--host", "no-such-host.invalid", "--port", "0", "--quiet"])
    with pytest.raises(ValueError, match="host must be a host name or address"):
        AnswerServer(answer_run, host="", port=0)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_the_command_stops_cleanly_on_a_signal(answer_run, sig):
    """``docker stop``/systemd send SIGTERM; a job started in the background ignores SIGINT
    unless the server installs its own handler: both stop it, exit code 0."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "milp.serve", str(answer_run), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------- streaming (server-sent events)
def _stream(server: AnswerServer, body: dict, conn=None) -> tuple[int, str, list[dict]]:
    """POST ``body`` with ``"stream": true``; ``(status, content type, the events' data)``. On
    ``conn`` (an ``http.client.HTTPConnection``), which stays open for another request."""
    import http.client

    host, port = server.address
    c = conn or http.client.HTTPConnection(host, port, timeout=120)
    c.request("POST", "/v1/answer", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode("utf-8")
    if conn is None:
        c.close()
    if r.status != 200:
        return r.status, r.getheader("Content-Type"), [json.loads(text)]
    assert text.endswith("\n\n") and all(e.startswith("data: ") for e in text[:-2].split("\n\n")), text
    return r.status, r.getheader("Content-Type"), [json.loads(e[6:]) for e in text[:-2].split("\n\n")]


def test_a_streamed_answer_is_the_answer_in_pieces_and_the_connection_goes_on(answer_run):
    """Every event but the last carries a piece; the pieces make the answer the last event (and a
    request without ``stream``) gives; the chunked response ends so that the kept-alive
    connection carries the next request."""
    import http.client

    users = _users(answer_run)[:2]
    want = answer(answer_run, [(u, q) for u in users for q in QUERIES[:2]], progress=False)
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        conn = http.client.HTTPConnection(*server.address, timeout=120)
        got = []
        for u in users:
            for q in QUERIES[:2]:
                status, ctype, events = _stream(server, {"user_id": u, "query": q}, conn)
                assert status == 200 and ctype == "text/event-stream; charset=utf-8"
                *pieces, last = events
                assert all(set(e) == {"delta"} and e["delta"] for e in pieces)
                assert last == {"user_id": u, "query": q, "answer": "".join(e["delta"] for e in pieces), "done": True}
                got.append(last["answer"])
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["requests"] == 4
        conn.close()
    assert got == want


def test_pieces_leave_as_they_are_made_and_a_failed_batch_repeats_none(answer_run, monkeypatch):
    """The first piece reaches the client while the answer is still being made (the fake
    generation waits for the client to have read it). A batch that fails after streaming part
    of its answers is answered again one request at a time from the start: the text already
    sent is not sent again; what of the answer the stream never handed on (", <user>" here)
    comes as a last piece before the answer."""
    users = _users(answer_run)[:2]
    calls, first_read = [], threading.Event()

    def fake(model, tok, records, *, stream=None, **kw):
        calls.append(len(records))
        for i in range(len(records)):
            stream(i, "Hel")
        if len(calls) == 1:  # the batch of both: fails after its first pieces
            assert first_read.wait(60)
            raise RuntimeError("out of memory (simulated)")
        stream(0, "He")  # the retry starts over: nothing new to send yet
        stream(0, "Hello")
        return [f"Hello, {records[0].user_id}"]

    monkeypatch.setattr(milp.pipeline, "generate_responses", fake)
    import http.client

    with AnswerServer(answer_run, port=0, batch_size=2, max_wait_ms=2000, batching="static") as server:
        host, port = server.address
        results: dict[int, list[str]] = {}

        def ask(k):
            c = http.client.HTTPConnection(host, port, timeout=120)
            c.request("POST", "/v1/answer", json.dumps({"user_id": users[k], "query": "q", "stream": True}))
            r = c.getresponse()
            lines = []
            while (line := r.readline()) != b"":
                if line.startswith(b"data: "):
                    lines.append(json.loads(line[6:]))
                    if lines[0] == {"delta": "Hel"} and len(lines) == 1:
                        first_read.set()
            results[k] = lines
            c.close()

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert calls == [2, 1, 1]
    for k in range(2):
        *pieces, last = results[k]
        assert [e["delta"] for e in pieces] == ["Hel", "lo", f", {users[k]}"]
        assert last["answer"] == f"Hello, {users[k]}" and last["done"] is True


def test_a_stream_whose_generation_fails_ends_with_an_error_event(answer_run, monkeypatch):
    def fail(model, tok, records, *, stream=None, **kw):
        stream(0, "partial")
        raise RuntimeError("device lost (simulated)")

    monkeypatch.setattr(milp.pipeline, "generate_responses", fail)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching="static") as server:
        status, _, events = _stream(server, {"user_id": _users(answer_run)[0], "query": "q"})
    assert status == 200 and events[0] == {"delta": "partial"}
    assert events[1] == {"error": "generation failed: RuntimeError: device lost (simulated)", "status": 500}


@pytest.mark.parametrize("stream", [1, "yes", None, [True]])
def test_a_stream_flag_that_is_not_a_bool_is_refused(answer_run, stream):
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        code, out = _post(server, {"user_id": _users(answer_run)[0], "query": "q", "stream": stream})
    assert code == 400 and "'stream' must be true or false" in out["error"]


def test_a_stream_for_an_unknown_user_gets_404_before_it_begins(answer_run):
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        status, ctype, (out,) = _stream(server, {"user_id": "nobody", "query": "q"})
    assert status == 404 and ctype.startswith("application/json") and "unknown user" in out["error"]


def test_a_stream_to_an_http10_client_comes_unchunked_and_closes(answer_run):
    """HTTP/1.0 knows no chunked framing: the events come as they are and the server closes the
    connection at the end of the stream."""
    import socket

    user = _users(answer_run)[0]
    want = answer(answer_run, [(user, QUERIES[0])], progress=False)[0]
    body = json.dumps({"user_id": user, "query": QUERIES[0], "stream": True}).encode()
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        with socket.create_connection(server.address, timeout=120) as s:
            s.sendall(b"POST /v1/answer HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            raw = b""
            while chunk := s.recv(65536):  # ends: the server closed the connection
                raw += chunk
    head, _, text = raw.decode("utf-8").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK") and "Transfer-Encoding" not in head and "Connection: close" in head
    *pieces, last = [json.loads(e[6:]) for e in text[:-2].split("\n\n")]
    assert last["answer"] == want == "".join(e["delta"] for e in pieces)


def test_a_stream_whose_client_leaves_ends_quietly_and_the_server_goes_on(answer_run, monkeypatch, capfd):
    """The client reads the first piece and hangs up: writing the next pieces fails in its
    handler alone (no traceback), the batch finishes, and the next request is answered."""
    import socket

    left, real = threading.Event(), milp.pipeline.generate_responses

    def slow(model, tok, records, *, stream=None, **kw):
        if stream is None:
            return real(model, tok, records, **kw)
        stream(0, "Hel")
        assert left.wait(60)
        for k in range(2, 40):  # more than a socket buffer's worth after the client left
            stream(0, "Hel" + "lo" * k * 1000)
        return ["Hel" + "lo" * 39 * 1000]

    monkeypatch.setattr(milp.pipeline, "generate_responses", slow)
    user = _users(answer_run)[0]
    body = json.dumps({"user_id": user, "query": "q", "stream": True}).encode()
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching="static") as server:
        s = socket.create_connection(server.address, timeout=60)
        s.sendall(b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b'data: {"delta": "Hel"}' not in got:
            got += s.recv(4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
        s.close()
        left.set()
        code, out = _post(server, {"user_id": user, "query": QUERIES[0]})
        assert code == 200 and out["answer"] == answer(answer_run, [(user, QUERIES[0])], progress=False)[0]
        assert server.stats()["requests"] == 2
    assert "Traceback" not in capfd.readouterr().err


def test_submit_refuses_an_on_delta_that_is_not_callable(answer_run):
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        with pytest.raises(TypeError, match="on_delta must be a callable or None, got str"):
            server.submit(_users(answer_run)[0], "q", on_delta="print")
        assert server.stats()["requests"] == 0


def _held_generation(monkeypatch, ticking: bool = False) -> tuple[list[list[str]], threading.Event, dict[str, bool]]:
    """Replace generation by one that waits (60 s at most) until ``stop(0)`` says its request was
    cancelled, then answers ``"partial"`` (streaming ``"par"`` first, and where ``ticking`` a
    ``"t"`` every 0.05 s meanwhile); returns the users of each call, an event set once a call is
    generating, and ``{user: whether stop ended it}``."""
    import time

    calls: list[list[str]] = []
    generating = threading.Event()
    stopped: dict[str, bool] = {}

    def held(model, tok, records, *, stop=None, stream=None, **kw):
        calls.append([r.user_id for r in records])
        if stream is not None:
            stream(0, "par")
        generating.set()
        deadline, text = time.monotonic() + 60, "par"
        while not stop(0) and time.monotonic() < deadline:
            time.sleep(0.05)
            if ticking and stream is not None:
                text += "t"
                stream(0, text)
        stopped[records[0].user_id] = stop(0)
        return ["partial"] * len(records)

    monkeypatch.setattr(milp.pipeline, "generate_responses", held)
    return calls, generating, stopped


def test_a_cancelled_future_is_never_generated_queued_and_ends_its_row_generating(answer_run, monkeypatch):
    """``submit(...).cancel()``: the request being generated sees ``stop`` say True (its batch
    ends), the queued one is dropped from its batch before generation, and the next request is
    answered as usual; ``/health`` counts both as cancelled."""
    import concurrent.futures

    a, b, c = _users(answer_run)[:3]
    calls, generating, stopped = _held_generation(monkeypatch)
    with AnswerServer(answer_run, port=0, batch_size=1, max_wait_ms=0, batching="static") as server:
        first = server.submit(a, "q")
        assert generating.wait(60)
        queued = server.submit(b, "q")
        assert queued.cancel() and first.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=0)
        monkeypatch.setattr(milp.pipeline, "generate_responses", lambda m, t, records, **kw: ["fine"] * len(records))
        assert server.submit(c, "q").result(timeout=60) == "fine"
    stats = server.stats()  # closed: the batcher has counted the last batch
    assert calls == [[a]] and stopped == {a: True}
    assert stats == {"requests": 3, "batches": 2, "largest_batch": 1, "cancelled": 2, "steps": 0}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_hangs_up_cancels_its_request(answer_run, monkeypatch, capfd, stream):
    """The client hangs up while its answer is being generated (before any piece of it, or after
    the first): its handler sees the closed connection, its row ends, and the server goes on."""
    import socket

    user = _users(answer_run)[0]
    calls, generating, stopped = _held_generation(monkeypatch)
    body = json.dumps({"user_id": user, "query": "q", "stream": stream}).encode()
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching="static") as server:
        with socket.create_connection(server.address, timeout=60) as s:
            s.sendall(b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert generating.wait(60)
            if stream:
                got = b""
                while b'data: {"delta": "par"}' not in got:
                    got += s.recv(4096)
        for _ in range(600):  # the handler looks every POLL_S
            if server.stats()["cancelled"]:
                break
            threading.Event().wait(0.05)
        assert stopped == {user: True} and server.stats()["cancelled"] == 1
        monkeypatch.setattr(milp.pipeline, "generate_responses", lambda m, t, records, **kw: ["fine"] * len(records))
        assert _post(server, {"user_id": user, "query": "q"}) == (200, {"user_id": user, "query": "q",
                                                                        "answer": "fine"})
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_request_past_its_time_gets_504_and_is_cancelled(answer_run, monkeypatch, stream):
    """``REQUEST_TIMEOUT_S`` after it came (the whole answer's time, however often pieces come),
    a request gets 504 (an error event, streamed) and is cancelled."""
    import milp.serve

    user = _users(answer_run)[0]
    _, _, stopped = _held_generation(monkeypatch, ticking=True)
    monkeypatch.setattr(milp.serve, "REQUEST_TIMEOUT_S", 0.5)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching="static") as server:
        if stream:
            status, _, (first, *ticks, last) = _stream(server, {"user_id": user, "query": "q"})
            assert status == 200 and first == {"delta": "par"} and all(e == {"delta": "t"} for e in ticks)
            assert last == {"error": "no answer within 0 s", "status": 504}
        else:
            assert _post(server, {"user_id": user, "query": "q"}) == (504, {"error": "no answer within 0 s"})
    assert stopped == {user: True}


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_metrics_count_what_the_server_did(answer_run, batching):
    """GET /metrics (Prometheus' text format, open as /health is): requests by how they ended,
    their prompt and generated tokens, latencies (time to first token and between tokens with
    continuous batching), decode steps, and nothing running or waiting once all are answered."""
    from prometheus_client.parser import text_string_to_metric_families

    users = _users(answer_run)[:2]
    with AnswerServer(answer_run, port=0, max_new_tokens=5, batching=batching, api_key="k") as server:
        answers = [f.result(timeout=60) for f in [server.submit(u, q) for u, q in zip(users, QUERIES)]]
        host, port = server.address
        with urllib.request.urlopen(f"{_url(host, port)}/metrics", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        steps = server.stats()["steps"]
        server.metrics = None  # an install without prometheus_client
        status, body = _get(server, "/metrics")
        assert status == 501 and "prometheus_client" in body["error"]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    reasons = [a.finish_reason for a in answers]
    for reason in ("stop", "length"):
        assert value("milp_requests_finished_total", finish_reason=reason) == reasons.count(reason)
    assert value("milp_prompt_tokens_total") == sum(a.prompt_tokens for a in answers) > 0
    assert value("milp_generation_tokens_total") == sum(a.new_tokens for a in answers) > 0
    assert value("milp_request_latency_seconds_count") == value("milp_request_queue_time_seconds_count") == 2
    tokens = sum(a.new_tokens for a in answers)
    if batching == "continuous":  # every token timed as it came; one step per forward
        assert value("milp_time_to_first_token_seconds_count") == 2
        assert value("milp_inter_token_latency_seconds_count") == tokens - 2
        assert value("milp_decode_steps_total") == steps > 0
    else:
        assert value("milp_time_to_first_token_seconds_count") == value("milp_decode_steps_total") == 0
    assert value("milp_requests_running") == value("milp_requests_waiting") == value("milp_kv_cache_bytes") == 0
