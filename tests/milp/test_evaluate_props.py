"""Property tests of milp.evaluate's bookkeeping (no model runs): the summary statistic is the
correctly rounded mean and sample standard deviation over seeds (equal values give exactly that
value and 0); aggregate scores each seed's predictions files exactly as milp.pipeline.score and
milp.metrics.win_rate do, whatever the order of the saved rows, and summarises each metric over
the seeds that have the method (n, seeds); a predictions file that does not hold the split's test
answers is refused naming it; --seeds parses any comma list of distinct ints >= 0 and refuses
the rest."""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import milp.evaluate as ev
from milp.data import Record
from milp.metrics import win_rate
from milp.pipeline import score, user_content

SETTINGS = settings(max_examples=40, deadline=None)

_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(xs=st.lists(_values, min_size=1, max_size=8), same=st.tuples(_values, st.integers(2, 8)))
@example(xs=[1e6, 999999.9999999999], same=(0.0, 2))  # the deviation from the rounded mean was 41% too big
def test_mean_std_is_the_correctly_rounded_sample_statistic(xs, same):
    mean, std = ev._mean_std(xs)
    exact = sum(map(Fraction, xs)) / len(xs)
    assert mean == float(exact)  # correctly rounded: no drift from summing in float
    assert min(xs) <= mean <= max(xs)
    if len(xs) == 1:
        assert std is None
    else:
        var = sum((Fraction(x) - exact) ** 2 for x in xs) / (len(xs) - 1)
        assert std == pytest.approx(math.sqrt(var), rel=1e-12, abs=1e-12) and std >= 0
    value, n = same  # equal values over the seeds: exactly that value, and no spread at all
    assert ev._mean_std([value] * n) == (value, 0.0)


class LongerWins:
    name = "longer-wins"

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"


_WORDS = ["rest", "knee", "ice", "water", "run", "pain", "doctor", "the", "a", "!"]
_answer = st.lists(st.sampled_from(_WORDS), max_size=6).map(" ".join)


def _records(n):
    return [Record(f"u{i}", "runner" if i % 2 else "", [f"I run {i} km", "my knee hurts"], f"Knee {i}?",
                   f"rest the knee and ice it {i}") for i in range(n)]


@st.composite
def _runs(draw):
    """{seed: (test records, {method: (answers, response CEs or None)})} with methods missing on some seeds."""
    runs = {}
    for seed in draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True)):
        test = _records(draw(st.integers(1, 4)))
        methods = draw(st.lists(st.sampled_from(["tplp", "milp", "uelp"]), max_size=3, unique=True))
        runs[seed] = (test, {m: (draw(st.lists(_answer, min_size=len(test), max_size=len(test))),
                                 draw(st.one_of(st.none(), st.lists(st.floats(0, 10), min_size=len(test),
                                                                    max_size=len(test)))))
                             for m in methods})
    return runs


@settings(max_examples=25, deadline=None)
@given(runs=_runs(), data=st.data())
def test_aggregate_is_the_per_seed_score_summarised_over_seeds(runs, data):
    methods = ["tplp", "milp", "uelp"]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for seed, (test, by_method) in runs.items():
            for m, (answers, ces) in by_method.items():
                path = out / f"seed{seed}" / m / "predictions.json"
                ev._save_predictions(path, m, seed, test, answers, trainable_parameters=7)
                info = json.loads(path.read_text())
                for row, ce in zip(info["rows"], ces or [None] * len(test)):
                    if ce is not None:
                        row["response_ce"] = ce
                info["rows"] = data.draw(st.permutations(info["rows"]))  # rows in any order
                path.write_text(json.dumps(info))
        res = ev.aggregate(out, list(runs), {s: {"test": t} for s, (t, _) in runs.items()}, LongerWins(), methods)
    assert res["judge"] == "longer-wins"
    for seed, (test, by_method) in runs.items():
        got = res["per_seed"].get(str(seed), {})
        assert set(got) == set(by_method)
        for m, (answers, ces) in by_method.items():
            want = score(test, answers)
            assert {k: got[m][k] for k in want} == want
            if ces is None:
                assert "response_ce" not in got[m]
            else:
                assert got[m]["response_ce"] == pytest.approx(sum(ces) / len(ces))
            if "tplp" in by_method:
                wr = win_rate(answers, by_method["tplp"][0], [r.query for r in test],
                              [user_content(r) for r in test], [r.response for r in test], judge=LongerWins())
                assert (got[m]["win_rate"], got[m]["wins"], got[m]["losses"]) == (wr.win_rate, wr.wins, wr.losses)
            else:
                assert "win_rate" not in got[m]
        if "tplp" in by_method:
            assert got["tplp"]["win_rate"] == 50.0  # against itself: every example a tie
    for m in methods:
        seeds = [s for s in runs if m in runs[s][1]]
        if not seeds:
            assert m not in res["summary"]
            continue
        summary = res["summary"][m]
        assert summary["seeds"] == seeds
        for key in ("rouge1", "rougeL", "persona_f1", "win_rate", "response_ce"):
            vals = [res["per_seed"][str(s)][m][key] for s in seeds if key in res["per_seed"][str(s)][m]]
            if not vals:
                assert key not in summary
                continue
            mean, std = ev._mean_std(vals)
            assert summary[key] == {"mean": mean, "std": std, "n": len(vals)}
            assert 0 <= mean <= (100 if key != "response_ce" else 10)


@SETTINGS
@given(n=st.integers(1, 4), change=st.sampled_from(["drop", "extra", "rename", "requery"]))
def test_predictions_that_do_not_match_the_split_are_refused(n, change):
    test = _records(n)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "predictions.json"
        ev._save_predictions(path, "m", 0, test, [f"a{i}" for i in range(n)])
        assert ev._predictions(path, test) == [f"a{i}" for i in range(n)]
        info = json.loads(path.read_text())
        rows = info["rows"]
        if change == "drop":
            rows.pop()
        elif change == "extra":
            rows.append(dict(rows[0], user_id="stranger"))
        elif change == "rename":
            rows[-1]["user_id"] = "stranger"
        else:
            rows[0]["query"] += " (edited)"
        path.write_text(json.dumps(info))
        with pytest.raises(ValueError, match=f"{path} does not hold this split's test answers"):
            ev._predictions(path, test)


@settings(max_examples=100, deadline=None)
@given(seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=5, unique=True),
       seps=st.lists(st.sampled_from([",", ", ", " ,", " , "]), min_size=5, max_size=5))
def test_seed_list_parses_distinct_non_negative_ints(seeds, seps):
    text = "".join(str(s) + sep for s, sep in zip(seeds, seps))[: -len(seps[len(seeds) - 1])]
    assert ev._seed_list(text) == tuple(seeds)
    for bad, message in ((text + "," + str(seeds[0]), "must not repeat"), (text + ",-1", "must be >= 0"),
                         (text + ",", "comma-separated ints"), (text + ",1.5", "comma-separated ints"),
                         (text + ",x", "comma-separated ints")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            ev._seed_list(bad)


def test_mean_std_regression_three_equal_values():
    """Three seeds scoring 0.1 each: the plain float sum gave 0.10000000000000002 ± 1.7e-17."""
    assert ev._mean_std([0.1, 0.1, 0.1]) == (0.1, 0.0)
