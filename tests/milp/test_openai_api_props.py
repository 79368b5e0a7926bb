"""``milp.openai_api.parse_chat`` on drawn request bodies: every body either parses into the
request it describes or raises ``RequestError`` naming a field of the API, never another error
(a handler's unexpected exception would drop the client's connection without an answer)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from milp.openai_api import _NO_OP, _READ, ChatRequest, RequestError, parse_chat

LIMIT = 64
_scalars = (st.none() | st.booleans() | st.integers(-3, 100) | st.floats(-2, 2) | st.just(float("nan"))
            | st.text(max_size=6))
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=6)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]),
                                  "content": st.text(max_size=12) | st.lists(st.fixed_dictionaries(
                                      {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=5)}),
                                      max_size=2) | _json})
_values = {  # per field: values that may be valid, and any JSON
    "model": st.sampled_from(["u1", "", " ", "meddia-d3-0294"]) | _json,
    "messages": st.lists(_message, max_size=2) | _json,
    "max_tokens": st.integers(-1, LIMIT + 2) | _json, "max_completion_tokens": st.integers(0, LIMIT + 1) | _json,
    "temperature": st.floats(0, 2) | _json, "top_p": st.floats(0, 1.2) | _json, "top_k": st.integers(-1, 50) | _json,
    "min_p": st.floats(0, 1) | _json, "seed": st.integers(-1, 2**40) | _json,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | _json,
    "stream": st.booleans() | _json, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
    "user": st.text(max_size=4) | _json, "n": st.sampled_from([1, 2, 16, 17, None]) | _json,
    "presence_penalty": st.sampled_from([0, 0.0, 0.5]) | _json, "frequency_penalty": st.sampled_from([0, -1]) | _json,
    "logprobs": st.booleans() | _json, "top_logprobs": st.integers(-1, 21) | _json, "tools": _json,
}


@st.composite
def bodies(draw):
    body = {"model": "u1", "messages": [{"role": "user", "content": "Is tea healthy?"}]}
    for k in draw(st.lists(st.sampled_from(sorted(_values)), max_size=5, unique=True)):
        body[k] = draw(_values[k])
    for k in draw(st.lists(st.sampled_from(["model", "messages"]), max_size=2, unique=True)):
        body.pop(k, None)
    return body


@settings(max_examples=400, deadline=None)
@given(body=bodies() | _json)
def test_a_body_parses_into_its_request_or_is_refused_naming_a_field(body):
    try:
        r = parse_chat(body, LIMIT)
    except RequestError as e:
        # a field of the API, or the body's own unsupported one
        assert e.param is None or e.param in _READ | set(_NO_OP) or e.param in body, e.param
        assert str(e)
        return
    assert isinstance(r, ChatRequest) and isinstance(body, dict)
    assert r.user == body["model"] and body["messages"][0]["role"] == "user" and r.query.strip()
    n = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    assert r.max_new_tokens == n and (n is None or 1 <= n <= LIMIT)
    assert (r.sampling is None) == (not body.get("temperature"))
    if r.sampling is not None:
        assert r.sampling.temperature == body["temperature"] and r.sampling.seed is not None
        assert body.get("seed") in (None, r.sampling.seed)
    assert r.stream == bool(body.get("stream")) and (not r.include_usage or r.stream)
    stop = body.get("stop")
    assert r.stop == ([stop] if isinstance(stop, str) else list(stop or []))
    assert r.logprobs == ((body.get("top_logprobs") or 0) if body.get("logprobs") else None)
    assert r.logprobs is None or 0 <= r.logprobs <= 20
    assert r.n == (body.get("n") or 1) and (r.n == 1 or r.sampling is not None)
