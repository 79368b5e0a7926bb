"""``milp.serve``'s OpenAI-compatible endpoints (``milp.openai_api``): ``POST /v1/chat/completions``
with the user as the ``model`` gives ``milp.answer``'s answer in OpenAI's shapes (usage and
finish reason included, streamed too), ``GET /v1/models`` lists the users, bad requests get
OpenAI's error object naming the field; and OpenAI's own client library reads all of it."""
from __future__ import annotations

import http.client
import json
import threading

import pytest
from test_serve import QUERIES, _get, _post, _users  # tests/milp is on sys.path

from milp.answer import answer
from milp.sampling import Sampling
from milp.serve import AnswerServer
from milp.store import UserStore

CHAT = "/v1/chat/completions"


def _chat(user: str, query, **kw) -> dict:
    return {"model": user, "messages": [{"role": "user", "content": query}], **kw}


def _details(a) -> tuple:
    """What an OpenAI completion says of an ``Answer``: its text, finish reason and usage."""
    return str(a), a.finish_reason, {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.new_tokens,
                                     "total_tokens": a.prompt_tokens + a.new_tokens}


def _said(body: dict) -> tuple:
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], body["usage"]


def _stream(server: AnswerServer, body: dict) -> tuple[int, list]:
    """POST a streamed chat completion: the status and the events' data (``[DONE]`` as a string)."""
    c = http.client.HTTPConnection(*server.address, timeout=120)
    c.request("POST", CHAT, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode("utf-8")
    c.close()
    assert r.getheader("Content-Type").startswith("text/event-stream"), text
    assert text.endswith("\n\n") and all(e.startswith("data: ") for e in text[:-2].split("\n\n")), text
    return r.status, [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in text[:-2].split("\n\n")]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_chat_completions_give_milp_answers_answers_with_usage_and_finish_reason(answer_run, batching):
    """Concurrent requests of several users (one cut at 2 tokens, one sampled with a seed, one
    with a stop string) get ``milp.answer``'s answers, finish reasons and token counts."""
    users = _users(answer_run)[:3]
    asks = [(users[i % 3], q) for i, q in enumerate(QUERIES)]
    want = answer(answer_run, asks, progress=False)
    short = answer(answer_run, asks[:1], max_new_tokens=2, progress=False)[0]
    sampled = answer(answer_run, asks[1:2], sampling=Sampling(0.9, top_p=0.9, seed=11), progress=False)[0]
    stop = str(want[2])[3:5]
    stopped = answer(answer_run, asks[2:3], stop_strings=[stop], progress=False)[0]
    bodies = [_chat(u, q) for u, q in asks] + [
        _chat(*asks[0], max_completion_tokens=2), _chat(*asks[1], temperature=0.9, top_p=0.9, seed=11),
        _chat(*asks[2], stop=stop)]
    with AnswerServer(answer_run, port=0, batch_size=4, max_wait_ms=2000, batching=batching) as server:
        got: dict[int, tuple[int, dict]] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _post(server, bodies[i], CHAT)))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got[i][0] for i in range(len(bodies))] == [200] * len(bodies), got
    assert [_said(got[i][1]) for i in range(len(bodies))] == [_details(a) for a in [*want, short, sampled, stopped]]
    assert short.finish_reason == "length" and short.new_tokens == 2 and stopped.finish_reason == "stop"
    for i, (u, _) in enumerate(asks):
        body = got[i][1]
        assert body["object"] == "chat.completion" and body["model"] == u and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["index"] == 0 and body["choices"][0]["message"]["role"] == "assistant"
        assert "seed" not in body and isinstance(body["created"], int)
    assert got[len(asks) + 1][1]["seed"] == 11


def test_a_streamed_chat_completion_is_the_answer_in_chunks(answer_run):
    user = _users(answer_run)[0]
    want = answer(answer_run, [(user, QUERIES[0])], progress=False)[0]
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        status, events = _stream(server, _chat(user, QUERIES[0], stream_options={"include_usage": True}))
        status2, plain = _stream(server, _chat(user, QUERIES[0]))
    assert (status, status2) == (200, 200)
    assert events[-1] == "[DONE]" and plain[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert {c["id"] for c in events[:-1]} == {events[0]["id"]} and events[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == user for c in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == str(want)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [want.finish_reason]
    assert all(c["usage"] is None for c in chunks)  # include_usage: every chunk has the key, the last its value
    assert usage["choices"] == [] and usage["usage"] == _details(want)[2]
    assert [c["choices"][0]["delta"] for c in plain[:-1]] == [c["choices"][0]["delta"] for c in chunks]
    assert all("usage" not in c for c in plain[:-1])


def _stored(run) -> list[str]:
    return sorted(map(str, UserStore(run / "users").users()))


def test_models_list_the_runs_users(answer_run):
    users = _stored(answer_run)
    assert set(_users(answer_run)) <= set(users)
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        status, listed = _get(server, "/v1/models")
        status1, one = _get(server, f"/v1/models/{users[0]}")
        status2, missing = _get(server, "/v1/models/nobody")
    assert (status, status1, status2) == (200, 200, 404)
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == users
    assert one == {"id": users[0], "object": "model", "created": 0, "owned_by": "milp"}
    assert missing["error"]["type"] == "not_found_error" and missing["error"]["param"] == "model"


BAD = [  # (body change, status, the field named, words of the message)
    ({"model": "nobody"}, 404, "model", "unknown model 'nobody'"),
    ({"model": 3}, 400, "model", "'model' must name a user"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}, 400,
     "messages", "one message of role 'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages", "list of text parts"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages", "must not be empty"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "'max_tokens' must be an int in [1,"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, 400, "max_completion_tokens", "disagree"),
    ({"n": 2}, 400, "n", "'n' > 1 needs a 'temperature' > 0"),
    ({"n": 17, "temperature": 1}, 400, "n", "'n' must be an int in [1, 16]"),
    ({"logprobs": 1}, 400, "logprobs", "'logprobs' must be true or false"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "'top_logprobs' must be an int in [0, 20]"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "'top_logprobs' needs 'logprobs': true"),
    ({"model": "u\ud83d"}, 400, "model", "'model' must be valid Unicode text, got a lone surrogate U+D83D"),
    ({"messages": [{"role": "user", "content": "Hi \ud83d"}]}, 400, "messages", "lone surrogate U+D83D at character 3"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "'presence_penalty' must be 0"),
    ({"tools": []}, 400, "tools", "unsupported fields ['tools']"),
    ({"top_p": 0.9}, 400, "top_p", "give a 'temperature' > 0 too"),
    ({"temperature": -1}, 400, "temperature", "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "1 to 4"),
    ({"stream": "yes"}, 400, "stream", "'stream' must be true or false"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only for a streamed request"),
]


def test_bad_chat_requests_get_openais_error_object_naming_the_field(answer_run):
    user = _users(answer_run)[0]
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        got = [_post(server, {**_chat(user, QUERIES[0]), **change}, CHAT) for change, *_ in BAD]
        fine = _post(server, {**_chat(user, [{"type": "text", "text": QUERIES[0]}]), "n": 1, "logprobs": False,
                              "presence_penalty": 0, "frequency_penalty": 0.0, "user": "end-user-7",
                              "max_tokens": 2}, CHAT)
        no_json = _post(server, b"{", CHAT)
    for (change, status, param, words), (code, body) in zip(BAD, got):
        assert code == status, (change, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (change, err)
        assert words in err["message"], (change, err["message"])
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert fine[0] == 200 and fine[1]["usage"]["completion_tokens"] <= 2
    assert fine[1]["choices"][0]["message"]["content"] == str(
        answer(answer_run, [(user, QUERIES[0])], max_new_tokens=2, progress=False)[0])
    assert no_json[0] == 400 and no_json[1]["error"]["type"] == "invalid_request_error"


def test_openais_client_library_talks_to_the_server(answer_run):
    """The ``openai`` package (an optional test dependency) lists the users, gets answers, streams,
    and raises its own errors for a bad request, an unknown user and a missing API key."""
    openai = pytest.importorskip("openai", reason="the openai client library is not installed")
    users = _stored(answer_run)
    want = answer(answer_run, [(users[0], QUERIES[1])], progress=False)[0]
    with AnswerServer(answer_run, port=0, max_wait_ms=0, api_key="k3y") as server:
        host, port = server.address
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="k3y", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == users
        r = client.chat.completions.create(model=users[0], messages=[{"role": "user", "content": QUERIES[1]}])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (str(want), want.finish_reason)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.new_tokens)
        pieces = [c for c in client.chat.completions.create(
            model=users[0], messages=[{"role": "user", "content": QUERIES[1]}], stream=True,
            stream_options={"include_usage": True})]
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == str(want)
        assert pieces[-1].usage.completion_tokens == want.new_tokens
        two = client.chat.completions.create(model=users[0], messages=[{"role": "user", "content": QUERIES[1]}],
                                             n=2, temperature=0.9, seed=5)
        assert [(c.index, c.message.content) for c in two.choices] == [(j, str(answer(
            answer_run, [(users[0], QUERIES[1])], sampling=Sampling(0.9, seed=5 + j), progress=False)[0]))
            for j in range(2)]
        with pytest.raises(openai.NotFoundError, match="unknown model"):
            client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "Hi?"}])
        with pytest.raises(openai.BadRequestError, match="one message of role 'user'"):
            client.chat.completions.create(model=users[0], messages=[{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "Hi?"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_chat_completions_give_the_tokens_logprobs(answer_run, batching):
    """``logprobs: true`` with ``top_logprobs``: one entry per token of the answer's text (the
    end-of-text token left out) with ``milp.answer``'s logprobs and alternatives; the entries'
    bytes make the answer's text (characters split across tokens included); streamed, they come
    with the last chunk; OpenAI's client reads them."""
    from milp.answer import load_run

    user = _users(answer_run)[0]
    want = answer(answer_run, [(user, QUERIES[2])], progress=False, logprobs=2, batching=batching)[0]
    _, tok, _, _ = load_run(answer_run, "cpu")
    content = [e for e in want.logprobs if e.token not in tok.all_special_ids]
    assert len(want.logprobs) == want.new_tokens and content
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching=batching) as server:
        code, body = _post(server, _chat(user, QUERIES[2], logprobs=True, top_logprobs=2), CHAT)
        plain = _post(server, _chat(user, QUERIES[2], logprobs=False), CHAT)[1]
        status, events = _stream(server, _chat(user, QUERIES[2], logprobs=True, top_logprobs=2))
    assert code == 200 and body["choices"][0]["message"]["content"] == str(want)
    got = body["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in got] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert [e["token"] for e in got] == [tok.decode([e.token]) for e in content]
    assert [[t["logprob"] for t in e["top_logprobs"]] for e in got] == [
        pytest.approx([v for _, v in e.top], abs=1e-4) for e in content]
    assert bytes(b for e in got for b in e["bytes"]).decode("utf-8", "replace").strip() == str(want)
    assert plain["choices"][0]["logprobs"] is None
    chunks = events[:-1]
    assert status == 200 and all(c["choices"][0]["logprobs"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["logprobs"]["content"] == got
    openai = pytest.importorskip("openai", reason="the openai client library is not installed")
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching=batching) as server:
        host, port = server.address
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=user, messages=[{"role": "user", "content": QUERIES[2]}],
                                           logprobs=True, top_logprobs=2)
    read = r.choices[0].logprobs.content
    assert [(e.token, e.bytes, len(e.top_logprobs)) for e in read] == [(e["token"], e["bytes"], 2) for e in got]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_n_choices_are_the_answers_of_consecutive_seeds(answer_run, batching):
    """``n: 3`` with a ``temperature`` and a ``seed``: choice ``j`` is the answer sampled alone with
    seed + ``j``, in one completion (usage: the prompt once, every choice's tokens) or one
    stream (each choice's chunks under its index, its finish reason, then the usage)."""
    user = _users(answer_run)[1]
    kw = dict(temperature=0.9, top_p=0.9)
    want = [answer(answer_run, [(user, QUERIES[0])], sampling=Sampling(0.9, top_p=0.9, seed=20 + j),
                   progress=False)[0] for j in range(3)]
    assert len({str(a) for a in want}) > 1  # the seeds give different answers
    with AnswerServer(answer_run, port=0, max_wait_ms=0, batching=batching, batch_size=4) as server:
        code, body = _post(server, _chat(user, QUERIES[0], n=3, seed=20, **kw), CHAT)
        status, events = _stream(server, _chat(user, QUERIES[0], n=3, seed=20, stream_options={"include_usage": True},
                                               **kw))
    assert code == 200 and body["seed"] == 20
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (j, str(a), a.finish_reason) for j, a in enumerate(want)]
    new = sum(a.new_tokens for a in want)
    assert body["usage"] == {"prompt_tokens": want[0].prompt_tokens, "completion_tokens": new,
                             "total_tokens": want[0].prompt_tokens + new}
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["usage"] == body["usage"]
    chunks = [c["choices"][0] for c in events[:-2]]
    for j, a in enumerate(want):
        mine = [c for c in chunks if c["index"] == j]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == str(a)
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [a.finish_reason]
