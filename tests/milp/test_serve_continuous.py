"""``milp.serve`` with continuous batching: a request that arrives while others generate joins
them at the next step and leaves at its own end; cancelled rows leave at once; one bad request
fails alone; the answers are the ones ``milp.answer`` gives."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
from test_serve import _post, _stream, _users  # tests/milp is on sys.path (pytest's rootdir-relative import)

import milp.decode
from milp.answer import answer
from milp.serve import AnswerServer, main


class Gate:
    """Holds each ``ContinuousBatch.step`` of the server until the test lets it run: ``wait()``
    waits until a step is held; ``run(n)`` lets ``n`` steps run, each time waiting until the next
    one is held; ``release(pause)`` lets every later step run, each after ``pause`` seconds.
    ``sizes``: the rows joined at each step."""

    def __init__(self, monkeypatch) -> None:
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.open = False
        self.pause = 0.0  # once open: seconds each step sleeps first
        self.sizes: list[int] = []
        real = milp.decode.ContinuousBatch.step

        def step(batch):
            self.sizes.append(len(batch))
            if not self.open:
                self.entered.release()
                assert self.gate.acquire(timeout=60), "the test never let this step run"
            time.sleep(self.pause)
            return real(batch)

        monkeypatch.setattr(milp.decode.ContinuousBatch, "step", step)

    def wait(self) -> None:
        assert self.entered.acquire(timeout=60), "no step came"

    def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()
            self.wait()

    def release(self, pause: float = 0.0) -> None:
        self.open, self.pause = True, pause
        for _ in range(64):
            self.gate.release()


def test_a_request_joins_a_running_batch_and_leaves_at_its_own_end(answer_run, monkeypatch):
    u0, u1 = _users(answer_run)[:2]
    long_q, short_q = "Tell me everything about sleep.", "Should I take ibuprofen?"
    want_long = answer(answer_run, [(u0, long_q)], max_new_tokens=8, progress=False)[0]
    want_short = answer(answer_run, [(u1, short_q)], max_new_tokens=2, progress=False)[0]
    assert want_long != answer(answer_run, [(u0, long_q)], max_new_tokens=4, progress=False)[0], \
        "precondition: the long answer goes on past its fourth token"
    gate = Gate(monkeypatch)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=8) as server:
        assert server.batching == "continuous"
        long = server.submit(u0, long_q)
        gate.wait()  # its prefill
        gate.run(1)  # the prefill ran (1 token); the next decode step waits
        short = server.submit(u1, short_q, max_new_tokens=2)
        gate.run(1)  # the long row's second token; the short one joins at the next step
        gate.run(2)  # short: prefill (its first token), then its second: it is done, the long row runs on
        assert short.result(timeout=30) == want_short
        assert not long.done()
        gate.release()
        assert long.result(timeout=60) == want_long
        stats = server.stats()
    assert gate.sizes[:4] == [1, 1, 2, 2] and gate.sizes[4] == 1  # the short row left after its last token
    assert stats["requests"] == 2 and stats["batches"] == 2 and stats["largest_batch"] == 2
    assert stats["steps"] == 8  # the long row's 8 tokens: the short one took no step of its own


def test_prompts_prefilled_in_chunks_get_the_answers_of_milp_answer(answer_run, monkeypatch):
    """``--prefill-chunk 8``: three requests' prompts (tens of tokens each) are prefilled 8 tokens
    a step, beside the rows already running; the answers are milp.answer's."""
    users = _users(answer_run)[:3]
    queries = ["Tell me everything about sleep.", "Should I take ibuprofen?", "What helps a sore throat?"]
    want = answer(answer_run, list(zip(users, queries)), max_new_tokens=6, progress=False)
    chunks: list[bool] = []
    real = milp.decode.ContinuousBatch._prefill

    def spy(batch, prefill):
        chunks.append(real(batch, prefill))
        return chunks[-1]

    monkeypatch.setattr(milp.decode.ContinuousBatch, "_prefill", spy)
    with AnswerServer(answer_run, port=0, max_new_tokens=6, max_wait_ms=0, prefill_chunk=8) as server:
        assert server.batching == "continuous" and server.prefill_chunk == 8
        got = [f.result(timeout=60) for f in [server.submit(u, q) for u, q in zip(users, queries)]]
    assert got == want
    assert chunks.count(False) >= 3 and chunks.count(True) >= 1  # unfinished chunks, then finished prefills
    with pytest.raises(SystemExit, match="prefill_chunk must be an int >= 1"):
        main([str(answer_run), "--port", "0", "--prefill-chunk", "0", "--quiet"])


def test_a_compiled_decode_step_gives_the_answers_of_milp_answer(answer_run, monkeypatch):
    """``--compile``: the continuous batch has a static cache (rows for the batch size, columns for
    the longest prompt and answer) and a compiled decode step (here torch.compile's ``eager``
    backend: inductor would take half a minute per width on this CPU); requests arriving at
    different times get milp.answer's answers. Static batching with it is refused."""
    import torch

    users = _users(answer_run)[:3]
    queries = ["Tell me everything about sleep.", "Should I take ibuprofen?", "What helps a sore throat?"]
    want = answer(answer_run, list(zip(users, queries)), max_new_tokens=6, progress=False)
    from torch._dynamo.testing import CompileCounter

    from milp.decode import static_widths

    compiled: list[dict] = []
    real, counter = torch.compile, CompileCounter()

    def counted_compile(fn, **kwargs):
        compiled.append(kwargs)
        return real(fn, **{**kwargs, "backend": counter})

    monkeypatch.setattr(torch, "compile", counted_compile)
    with AnswerServer(answer_run, port=0, max_new_tokens=6, max_wait_ms=0, batch_size=2, compile=True) as server:
        assert server.batching == "continuous" and server.compile
        widths = static_widths(server._max_prompt + server.max_new_tokens)
        first = server.submit(users[0], queries[0])
        time.sleep(0.05)
        rest = [server.submit(u, q) for u, q in zip(users[1:], queries[1:])]
        got = [f.result(timeout=120) for f in [first, *rest]]
    assert got == want
    assert compiled == [{"backend": "inductor", "dynamic": False}]  # CPU: inductor, one compile call
    # the warm-up traced each width once, the banks sized for the run's users first: loading them traced nothing
    assert counter.frame_count == len(widths) > 1
    with pytest.raises(SystemExit, match="compile needs continuous batching"):
        main([str(answer_run), "--port", "0", "--compile", "--batching", "static", "--quiet"])


def test_compile_sizes_the_banks_for_the_users_it_can_read(answer_run, tmp_path, monkeypatch):
    """``--compile`` sizes the banks for the run's users' configurations: one it cannot read (a
    damaged file) is left out, and the server starts and answers the others as milp.answer does."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(answer_run, run)
    users = _users(run)
    from milp.store import UserStore

    (UserStore(run / "users").path(users[0]) / "memory_config.json").write_text("{not json")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    want = answer(answer_run, [(users[1], "Should I take ibuprofen?")], max_new_tokens=4, progress=False)
    with AnswerServer(run, port=0, max_new_tokens=4, max_wait_ms=0, batch_size=2, compile=True) as server:
        configs = server._user_configs()
        assert configs and len(configs) <= len(users) - 1
        assert [server.submit(users[1], "Should I take ibuprofen?").result(timeout=120)] == want


def test_a_cancelled_row_leaves_at_the_next_step(answer_run, monkeypatch):
    u0, u1 = _users(answer_run)[:2]
    gate = Gate(monkeypatch)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=8, batch_size=2) as server:
        first = server.submit(u0, "one")
        gate.wait()
        second = server.submit(u1, "two")
        gate.run(2)  # the first's prefill, then a decode step with the second's prefill
        assert first.cancel()
        gate.run(1)
        assert gate.sizes[-1] == 1  # the first row left before this step
        gate.release()
        assert second.result(timeout=60) == answer(answer_run, [(u1, "two")], max_new_tokens=8, progress=False)[0]
        assert server.stats()["cancelled"] == 1


def test_a_queued_request_cancelled_before_it_joins_is_never_generated(answer_run, monkeypatch):
    u0, u1 = _users(answer_run)[:2]
    gate = Gate(monkeypatch)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=4, batch_size=1) as server:
        first = server.submit(u0, "one")
        gate.wait()
        queued = server.submit(u1, "two")  # the batch is full (one row): it waits in the queue
        assert queued.cancel()
        gate.release()
        first.result(timeout=60)
        later = server.submit(u1, "three", max_new_tokens=1)
        assert later.result(timeout=60) == answer(answer_run, [(u1, "three")], max_new_tokens=1, progress=False)[0]
        assert max(gate.sizes) == 1
    assert server.stats()["cancelled"] == 1


def test_a_client_that_hangs_up_mid_stream_cancels_its_row(answer_run, monkeypatch):
    u0 = _users(answer_run)[0]
    gate = Gate(monkeypatch)
    with AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=64) as server:
        host, port = server.address
        body = json.dumps({"user_id": u0, "query": "hello there", "stream": True}).encode()
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            gate.run(2)  # two tokens generated (and streamed)
        gate.release(pause=0.25)  # then a step every 0.25 s: the handler sees the hang-up within 0.25 s
        deadline = time.monotonic() + 30
        while not server.stats()["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats()["cancelled"] == 1
        assert len(gate.sizes) < 20  # left long before its 64 tokens


def test_a_damaged_user_fails_alone_and_the_others_are_answered(answer_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(answer_run, run)
    users = _users(run)
    bad, good = users[0], users[1]
    from milp.store import UserStore

    for f in UserStore(run / "users").path(bad).glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    want = answer(answer_run, [(good, "hi")], progress=False)[0]
    with AnswerServer(run, port=0, max_wait_ms=500, batch_size=2) as server:
        got: dict[str, tuple[int, dict]] = {}
        ts = [threading.Thread(target=lambda u=u: got.__setitem__(u, _post(server, {"user_id": u, "query": "hi"})))
              for u in (bad, good)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert got[good] == (200, {"user_id": good, "query": "hi", "answer": want})
        assert got[bad][0] == 500
        assert _post(server, {"user_id": good, "query": "hi"})[1]["answer"] == want  # the server goes on


def test_streamed_pieces_concatenate_to_the_answer_of_every_length(answer_run):
    u0, u1 = _users(answer_run)[:2]
    with AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=6) as server:
        for user, n in ((u0, 6), (u1, 1), (u0, 3)):
            status, _, events = _stream(server, {"user_id": user, "query": "What helps a cold?", "stream": True,
                                                 "max_new_tokens": n})
            want = answer(answer_run, [(user, "What helps a cold?")], max_new_tokens=n, progress=False)[0]
            assert status == 200 and events[-1]["done"] and events[-1]["answer"] == want
            assert "".join(e.get("delta", "") for e in events) == want


def test_closing_answers_the_rows_running_and_refuses_the_rest(answer_run, monkeypatch):
    u0, u1 = _users(answer_run)[:2]
    gate = Gate(monkeypatch)
    server = AnswerServer(answer_run, port=0, max_wait_ms=0, max_new_tokens=3, batch_size=1)
    server.start()
    running = server.submit(u0, "one")
    gate.wait()
    waiting = server.submit(u1, "two")
    closer = threading.Thread(target=server.close)
    closer.start()
    gate.release()
    closer.join(60)
    assert not closer.is_alive()
    assert running.result(timeout=0) == answer(answer_run, [(u0, "one")], max_new_tokens=3, progress=False)[0]
    with pytest.raises(Exception) as e:  # noqa: PT011 (its type is checked below)
        waiting.result(timeout=0)
    assert type(e.value).__name__ == "_Closing"


def test_a_model_continuous_batching_cannot_decode_falls_back_or_is_refused(answer_run, monkeypatch, capfd):
    monkeypatch.setattr(milp.decode, "continuous_unsupported", lambda model, reach=None: "it is odd")
    with AnswerServer(answer_run, port=0, log=True) as server:
        assert server.batching == "static"
        assert _post(server, {"user_id": _users(answer_run)[0], "query": "hi"})[0] == 200
    assert "static batching: it is odd" in capfd.readouterr().err
    with pytest.raises(ValueError, match="batching='continuous'.*it is odd"):
        AnswerServer(answer_run, port=0, batching="continuous")
    with pytest.raises(ValueError, match="batching must be one of auto, continuous, static"):
        AnswerServer(answer_run, port=0, batching="dynamic")
    with pytest.raises(SystemExit):
        main([str(answer_run), "--port", "0", "--batching", "dynamic"])


def test_a_batch_that_breaks_answers_500_to_its_rows_and_the_server_goes_on(answer_run, monkeypatch):
    user = _users(answer_run)[0]
    real, calls = milp.decode.ContinuousBatch.step, []

    def broken_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("a bug of the batch, not the model's")
        return real(batch)

    monkeypatch.setattr(milp.decode.ContinuousBatch, "step", broken_once)
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        status, out = _post(server, {"user_id": user, "query": "hi"})
        assert status == 500 and "a bug of the batch" in out["error"]
        assert _post(server, {"user_id": user, "query": "hi"}) == (
            200, {"user_id": user, "query": "hi", "answer": answer(answer_run, [(user, "hi")], progress=False)[0]})


def test_a_second_interrupt_while_closing_stops_at_once(answer_run, monkeypatch, capfd):
    """The first SIGINT closes the server, which waits for the rows being generated; a second one
    stops that wait: ``serve_forever`` raises ``KeyboardInterrupt`` (the command exits 130 with a
    line, not a traceback), the signal handlers restored."""
    import os
    import signal

    gate = Gate(monkeypatch)
    server = AnswerServer(answer_run, port=0, max_wait_ms=0, log=True)
    before = signal.getsignal(signal.SIGINT)
    held: dict = {}

    def interrupt_twice():
        while not server._threads:
            time.sleep(0.01)
        held["future"] = server.submit(_users(answer_run)[0], "Tell me everything about sleep.")
        gate.wait()  # its prefill is held
        os.kill(os.getpid(), signal.SIGINT)
        while not server.closing:
            time.sleep(0.01)
        time.sleep(0.3)  # close() waits for the held row
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=interrupt_twice)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        server.serve_forever()
    helper.join(30)
    assert signal.getsignal(signal.SIGINT) is before
    assert not held["future"].done()  # not answered: the second interrupt did not wait for it
    assert "closing: the requests being generated are answered first" in capfd.readouterr().err
    gate.release()  # the batcher, a daemon thread, would die with the process; here it finishes the row
    assert isinstance(held["future"].result(timeout=60), str)

    monkeypatch.setattr(AnswerServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([str(answer_run), "--port", "0", "--quiet"]) == 130
    assert "milp.serve: stopped without answering the requests being generated" in capfd.readouterr().err
