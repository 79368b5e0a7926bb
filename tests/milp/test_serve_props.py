"""``python -m milp.serve`` under awkward clients and shutdowns: kept-alive connections, bodies
that do not match their headers, text that is not Unicode, a damaged user among many concurrent
clients, and close() racing requests; no thread hangs and each client gets its own answer or an
error naming its problem."""
from __future__ import annotations

import http.client
import json
import queue
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import milp.pipeline
import milp.serve
from milp.serve import AnswerServer, _Closing


def _users(run) -> list[str]:
    split = json.loads((run / "split.json").read_text())
    return sorted(split["train"] + split["val"] + split["test"])


def _post(server: AnswerServer, body, timeout: float = 60) -> tuple[int, dict]:
    host, port = server.address
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}/v1/answer", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _concurrently(client, n: int) -> None:
    """``client(i)`` for i in range(n), each in its own thread at once; all must end within 120 s."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"


def _raw(server: AnswerServer, data: bytes, timeout: float = 10) -> bytes:
    """Everything the server sends back on one connection carrying ``data``, until it closes it
    (``<no close>`` appended where it kept the connection open ``timeout`` seconds)."""
    out = b""
    with socket.create_connection(server.address, timeout=timeout) as c:
        c.sendall(data)
        try:
            while chunk := c.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<no close>"
    return out


def _in_one_batch(server: AnswerServer, bodies: list) -> list[tuple[int, dict]]:
    """``bodies`` posted at once (the server waits long enough to batch them together)."""
    got: dict[int, tuple[int, dict]] = {}
    threads = [threading.Thread(target=lambda i=i, b=b: got.__setitem__(i, _post(server, b)))
               for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [got[i] for i in range(len(bodies))]


def test_a_lone_surrogate_is_refused_and_fails_no_other_request(answer_run):
    """JSON escapes make lone surrogates: as a user id the handler crashed (no response at all),
    as a query it failed the whole batch (every user's request in it got 500)."""
    a, b = _users(answer_run)[:2]
    with AnswerServer(answer_run, port=0, batch_size=4, max_wait_ms=1000) as server:
        code, out = _post(server, b'{"user_id": "\\ud800", "query": "hi"}')
        assert code == 400 and "'user_id' must be valid Unicode text" in out["error"]
        bad, good = _in_one_batch(server, [{"user_id": a, "query": "hi \ud83d"}, {"user_id": b, "query": "hello"}])
    assert bad[0] == 400 and "lone surrogate U+D83D at character 3" in bad[1]["error"]
    assert good[0] == 200 and good[1]["answer"] == good[1]["answer"].strip()


def test_a_deeply_nested_body_gets_400_not_a_dropped_connection(answer_run):
    """json.loads raises RecursionError (not a JSONDecodeError) for "[[[[…" well within the size
    limit: the handler died and the client got no response at all."""
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        code, out = _post(server, b"[" * 100_000)
        assert code == 400 and "nested too deeply" in out["error"]
        assert _get_health(server)["requests"] == 0


def _get_health(server: AnswerServer) -> dict:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=30) as r:
        return json.loads(r.read())


def test_a_damaged_user_fails_only_its_own_requests_among_many_concurrent_clients(answer_run, tmp_path,
                                                                                  monkeypatch):
    """20 clients, 3 requests each, 5 users, one of them damaged: its requests get 500 naming
    it; every other request gets 200 with the answer generated for its own (user, query), though
    it shared a batch with the damaged user (the whole batch used to get 500)."""
    run = shutil.copytree(answer_run, tmp_path / "run")
    users = _users(run)[:5]
    damaged = users[0]
    (run / "users" / damaged / "adapters.safetensors").write_bytes(b"not a safetensors file")
    real, generated = milp.pipeline.generate_responses, {}

    def spy(model, tok, records, **kw):
        out = real(model, tok, records, **kw)
        generated.update({(r.user_id, r.query): a for r, a in zip(records, out)})
        return out

    monkeypatch.setattr(milp.pipeline, "generate_responses", spy)
    got: dict[tuple[int, int], tuple[int, dict]] = {}

    def client(i):
        for k in range(3):
            got[i, k] = _post(server, {"user_id": users[(i + k) % 5], "query": f"Question {i}-{k}: is it serious?"})

    with AnswerServer(run, port=0, batch_size=8, max_wait_ms=20, batching="static") as server:
        _concurrently(client, 20)
        stats = server.stats()
    assert len(got) == 60 and stats["requests"] == 60 and stats["largest_batch"] > 1
    for (i, k), (code, out) in got.items():
        user, query = users[(i + k) % 5], f"Question {i}-{k}: is it serious?"
        if user == damaged:
            assert code == 500 and "a damaged save_user directory" in out["error"]
        else:
            assert code == 200, out
            assert (out["user_id"], out["query"], out["answer"]) == (user, query, generated[user, query])


def test_a_response_sent_before_the_body_is_read_closes_the_connection(answer_run):
    """On a kept-alive connection the unread body of a refused POST (a wrong path, a chunked
    body) was read as the next request: a second, HTML response, and the client's next request
    answered with it."""
    user = _users(answer_run)[0]
    body = json.dumps({"user_id": user, "query": "hi"}).encode()
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        conn = http.client.HTTPConnection(*server.address, timeout=60)
        try:
            for path, status in (("/v1/answer", 200), ("/answer", 404), ("/v1/answer", 200), ("/v1/answer", 200)):
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                assert (r.status, r.getheader("Content-Type")) == (status, "application/json; charset=utf-8")
                assert json.loads(r.read())
            conn.request("GET", "/health")
            assert json.loads(conn.getresponse().read())["requests"] == 3
        finally:
            conn.close()
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        chunked = _raw(server, b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" + health)
        assert chunked.count(b"HTTP/1.1 ") == 1 and chunked.startswith(b"HTTP/1.1 411 ")
        assert b"Connection: close" in chunked and b"<no close>" not in chunked
        for length, message in ((b"-1", b"Content-Length must be a number of bytes"),
                                (b"12abc", b"Content-Length must be a number of bytes"),
                                (b"%d" % (milp.serve.MAX_BODY_BYTES + 1), b"must be at most")):
            out = _raw(server, b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
            status = b"413" if message == b"must be at most" else b"400"
            assert out.startswith(b"HTTP/1.1 " + status) and message in out and b"<no close>" not in out


def test_a_body_shorter_than_its_content_length_gets_408_not_a_hung_thread(answer_run, monkeypatch):
    """A client announcing more bytes than it sends held its handler thread forever (no read
    timeout); an idle kept-alive connection too."""
    monkeypatch.setattr(milp.serve, "READ_TIMEOUT_S", 0.5, raising=False)
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        out = _raw(server, b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"user_id\"")
        assert out.startswith(b"HTTP/1.1 408 ") and b"ended after 10 of its Content-Length 100" in out
        assert b"<no close>" not in out  # closed by the server, not left open past the client's 10 s
        assert _raw(server, b"") == b""  # an idle connection is closed too
        assert _post(server, {"user_id": _users(answer_run)[0], "query": "hi"})[0] == 200


def test_a_request_submitted_while_closing_is_refused_not_left_waiting(answer_run):
    """submit() checked "closing" and queued in two steps: a request queued after close()
    emptied the queue was never answered (its client waited REQUEST_TIMEOUT_S for a 504)."""
    server = AnswerServer(answer_run, port=0, max_wait_ms=0)
    putting = threading.Event()

    class SlowQueue(queue.Queue):
        def put(self, item, *a, **k):
            putting.set()
            time.sleep(0.5)  # close() runs meanwhile
            super().put(item, *a, **k)

    server._queue = SlowQueue()
    futures = []
    t = threading.Thread(target=lambda: futures.append(server.submit(_users(answer_run)[0], "hi")))
    t.start()
    assert putting.wait(10)
    server.close()
    t.join(10)
    with pytest.raises(_Closing):
        futures[0].result(timeout=5)


def test_a_closed_server_refuses_to_start_and_its_health_says_closing(answer_run):
    """start() after close() ran a batcher that stopped at once and a listener that died on the
    closed socket: a server that took nothing; /health answered "ok" while answers got 503."""
    server = AnswerServer(answer_run, port=0, max_wait_ms=0)
    server.start()
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
        server.close()
        conn.request("GET", "/health")  # the kept-alive connection outlives the listener
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())["status"]) == (503, "closing")
    finally:
        conn.close()
    for use in (server.start, server.__enter__):
        with pytest.raises(RuntimeError, match="the server is closed"):
            use()


def test_close_after_a_failed_start_does_not_hang(answer_run, monkeypatch):
    """A start() whose listener thread could not start left close() waiting forever in
    shutdown() for a serve_forever that never ran."""
    server = AnswerServer(answer_run, port=0, max_wait_ms=0)
    real = threading.Thread.start

    def no_listener(self):
        if self.name == "milp-serve-http":
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", no_listener)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        server.start()
    monkeypatch.setattr(threading.Thread, "start", real)
    closer = threading.Thread(target=server.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hangs"
    assert not any(t.is_alive() for t in threading.enumerate() if t.name == "milp-serve-batcher")


def test_a_serve_forever_that_cannot_start_leaves_the_signal_handlers_as_they_were(answer_run):
    """serve_forever() installed its SIGINT/SIGTERM handlers before start(): a start() that
    raised (the server already started) left them installed, and Ctrl-C no longer stopped the
    process."""
    import signal

    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with pytest.raises(RuntimeError, match="already started"):
            server.serve_forever()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        assert _get_health(server)["status"] == "ok"  # and the server it did not start still serves


def test_clients_hanging_up_among_many_leave_the_others_answers_as_they_were(answer_run):
    """24 concurrent clients of 4 users asking for 1–3 tokens, streamed or not; a third of them
    hang up at a random moment (before the batch, during it, or after). Every other client gets
    the answer of its own (user, query, length), as ``milp.answer`` gives it alone; no thread
    hangs, the server answers on, and no more requests are cancelled than clients hung up."""
    import random

    from milp.answer import answer

    users = _users(answer_run)[:4]
    rng = random.Random(7)
    asks = [(users[i % 4], f"Question {i}: is it serious?", 1 + i % 3, rng.random() < 0.5, i % 3 == 0)
            for i in range(24)]  # (user, query, max_new_tokens, stream, hangs up)
    want = {(u, q, n): a for n in (1, 2, 3)
            for (u, q, _, _, _), a in zip([x for x in asks if x[2] == n],
                                          answer(answer_run, [(u, q) for u, q, m, _, _ in asks if m == n],
                                                 max_new_tokens=n, progress=False))}
    got: dict[int, tuple[int, dict]] = {}

    def client(i):
        u, q, n, stream, hangs = asks[i]
        body = json.dumps({"user_id": u, "query": q, "max_new_tokens": n, "stream": stream}).encode()
        if hangs:
            with socket.create_connection(server.address, timeout=60) as s:
                s.sendall(b"POST /v1/answer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(rng.random() * 0.05)
            return
        if not stream:
            got[i] = _post(server, {"user_id": u, "query": q, "max_new_tokens": n})
            return
        c = http.client.HTTPConnection(*server.address, timeout=60)
        c.request("POST", "/v1/answer", body)
        r = c.getresponse()
        events = [json.loads(e[6:]) for e in r.read().decode()[:-2].split("\n\n")]
        c.close()
        got[i] = r.status, events[-1]

    with AnswerServer(answer_run, port=0, batch_size=6, max_wait_ms=20) as server:
        _concurrently(client, 24)
        u, q, n, _, _ = asks[1]
        assert _post(server, {"user_id": u, "query": q, "max_new_tokens": n}) == (
            200, {"user_id": u, "query": q, "answer": want[u, q, n]})
        deadline = time.monotonic() + 30  # a hung-up client's handler may be behind it
        while server.stats()["requests"] < 25 and time.monotonic() < deadline:
            time.sleep(0.05)
    stats = server.stats()
    assert sorted(got) == [i for i in range(24) if not asks[i][4]]
    for i, (code, out) in got.items():
        u, q, n, stream, _ = asks[i]
        assert code == 200 and out["answer"] == want[u, q, n], (i, out)
        assert out.get("done") is (True if stream else None)
    assert stats["requests"] == 25 and stats["cancelled"] <= 8


def test_a_burst_of_connections_waits_for_accept_instead_of_being_dropped(answer_run):
    """64 clients connect while no connection is accepted yet (the server not started): each is
    queued by the listening socket (socketserver's backlog of 5 dropped or reset most of such a
    burst), and each gets its answer once the server runs."""
    user = _users(answer_run)[0]
    body = json.dumps({"user_id": user, "query": "q", "max_new_tokens": 1}).encode()
    server = AnswerServer(answer_run, port=0, batch_size=8, max_wait_ms=20)  # listening, not accepting
    try:
        socks = [socket.create_connection(server.address, timeout=5) for _ in range(64)]
        for s in socks:
            s.sendall(b"POST /v1/answer HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
        server.start()
        for s in socks:
            with s:
                assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    finally:
        server.close()
    assert server.stats()["requests"] == 64
