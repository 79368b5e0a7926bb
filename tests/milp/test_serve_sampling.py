"""Sampled answers from ``milp.serve`` and ``milp.answer``: a request with a temperature and a
seed gets the answer ``milp.answer`` samples with that seed, whatever it is batched with and
with either batching; without a seed, the answer names the seed drawn, which repeats it."""
from __future__ import annotations

import json
import threading

import pytest
from test_serve import QUERIES, _post, _stream, _users  # tests/milp is on sys.path

from milp import answer as answer_cli
from milp.answer import answer
from milp.sampling import Sampling
from milp.serve import AnswerServer


def _concurrently(server: AnswerServer, bodies: list[dict]) -> list[tuple[int, dict]]:
    got: dict[int, tuple[int, dict]] = {}

    def ask(i):
        got[i] = _post(server, bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [got[i] for i in range(len(bodies))]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_seeded_request_gets_its_answer_whatever_it_is_batched_with(answer_run, batching):
    users = _users(answer_run)[:2]
    asks = [(users[i % 2], q) for i, q in enumerate(QUERIES)]
    settings = [dict(temperature=1.0, seed=7), dict(temperature=0.7, top_p=0.9, seed=8), {},
                dict(temperature=1.3, top_k=20, min_p=0.02, seed=9)]
    want = [answer(answer_run, [a], progress=False, sampling=Sampling(**s) if s else None)[0]
            for a, s in zip(asks, settings)]
    greedy = answer(answer_run, asks, progress=False)
    assert want[2] == greedy[2] and want != greedy, "precondition: sampling changes the answers"
    bodies = [{"user_id": u, "query": q, **s} for (u, q), s in zip(asks, settings)]
    with AnswerServer(answer_run, port=0, batch_size=4, max_wait_ms=2000, batching=batching) as server:
        got = _concurrently(server, bodies)
        again = [_post(server, b) for b in reversed(bodies)][::-1]  # one at a time, in another order
    for (status, out), s, w in zip(got, settings, want):
        assert status == 200 and out["answer"] == w
        assert out.get("seed") == s.get("seed")  # a greedy answer names no seed
    assert again == got


def test_an_unseeded_request_names_the_seed_that_repeats_it(answer_run):
    user = _users(answer_run)[0]
    body = {"user_id": user, "query": QUERIES[1], "temperature": 1.5}
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:
        firsts = [_post(server, body) for _ in range(3)]
        assert all(status == 200 and isinstance(out["seed"], int) for status, out in firsts)
        assert len({out["seed"] for _, out in firsts}) == 3
        for _, out in firsts:
            assert _post(server, {**body, "seed": out["seed"]})[1] == out
        status, _, events = _stream(server, {**body, "seed": firsts[0][1]["seed"]})
    assert status == 200 and events[-1] == {**firsts[0][1], "done": True}
    assert "".join(e["delta"] for e in events[:-1]) == firsts[0][1]["answer"]
    with AnswerServer(answer_run, port=0, max_wait_ms=0) as server:  # zero temperature: greedy, no seed
        assert _post(server, {**body, "temperature": 0, "seed": 3}) == _post(server, {"user_id": user,
                                                                                     "query": QUERIES[1]})
        with pytest.raises(TypeError, match="sampling must be a milp.Sampling or None, got float"):
            server.submit(user, "q", sampling=0.5)


def test_the_command_samples_with_a_seed_and_prints_the_one_it_drew(answer_run, tmp_path, capsys):
    user = _users(answer_run)[0]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"user_id": user, "query": q}) + "\n" for q in QUERIES[:2]))
    out = tmp_path / "a.jsonl"
    argv = [str(answer_run), "--queries", str(queries), "--output", str(out), "--no-progress", "--temperature", "1.2"]
    assert answer_cli.main([*argv, "--top-p", "0.95", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = answer(answer_run, [(user, q) for q in QUERIES[:2]], progress=False, sampling=Sampling(1.2, top_p=0.95,
                                                                                                  seed=5))
    assert [r["answer"] for r in rows] == want and {r["seed"] for r in rows} == {5}
    capsys.readouterr()
    assert answer_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "milp.answer: sampled with --seed " in err
    seed = int(err.split("--seed ")[1].split()[0])
    drawn = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["seed"] for r in drawn} == {seed}
    assert answer_cli.main([*argv, "--seed", str(seed)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == drawn


@pytest.mark.parametrize("flags, match", [
    (["--top-p", "0.9"], "--top-p shapes sampled answers: give --temperature > 0"),
    (["--seed", "3"], "--seed shapes sampled answers"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "1", "--top-k", "-2"], "--top-k must be an int >= 0"),
    (["--temperature", "1", "--min-p", "3"], r"--min-p must be a number in \[0, 1\]"),
])
def test_the_command_refuses_bad_sampling_flags_by_name(answer_run, flags, match):
    user = _users(answer_run)[0]
    with pytest.raises(SystemExit, match=match):
        answer_cli.main([str(answer_run), "--user", user, "hi", "--no-progress", *flags])
    with pytest.raises(TypeError, match="sampling must be a milp.Sampling or None"):
        answer(answer_run, [(user, "hi")], sampling={"temperature": 1.0})


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_command_answers_alike_with_either_batching(answer_run, tmp_path, batching):
    """The run's own predictions (static batches in its evaluation) from ``--batching`` either way;
    sampled answers too, with one seed."""
    split = json.loads((answer_run / "split.json").read_text())
    preds = [json.loads(line) for line in (answer_run / "predictions.jsonl").read_text().splitlines()]
    asks = [(p["user_id"], p["query"]) for p in preds if p["user_id"] in split["test"]][:6]
    want = {(p["user_id"], p["query"]): p["prediction"] for p in preds}
    assert answer(answer_run, asks, progress=False, batching=batching) == [want[a] for a in asks]
    sampled = Sampling(1.1, top_k=30, seed=3)
    assert answer(answer_run, asks, progress=False, batching=batching, sampling=sampled) == answer(
        answer_run, asks, progress=False, batching="static" if batching == "continuous" else "continuous",
        sampling=sampled)
    with pytest.raises(ValueError, match="batching must be 'auto', 'continuous' or 'static', got 'x'"):
        answer(answer_run, asks, batching="x")
