"""Property tests of the results half of ``milp.evaluate`` (no model runs: predictions files are
written as the comparison writes them, :func:`milp.evaluate._save_predictions` plus the response
CE of each row, and scored by a stub judge).

What holds: the paired differences compare MiLP with each method on exactly the test examples both
answered, example by example in the split's order (whatever the order of the saved rows, a query
asked twice included), pooled over the seeds that have both; they are MiLP minus the method (the
sign of the mean, of its table cell and the header agree); the interval contains the mean and the
p-value lies in (0, 1], 1 for identical answers; the tables do not depend on the order in which
the seeds or methods are given; a cell that averages fewer seeds than its row's count says so;
every markdown table keeps its columns whatever the values (NaN, inf, one seed, missing metrics,
missing costs); the win rate counts every verdict once, ties half; the cost table's wall time per
seed averages the seeds that recorded timings.

Each "Was:" names what a test caught before its fix."""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import milp.evaluate as ev
from milp.data import Record
from milp.metrics import paired_difference

SETTINGS = settings(max_examples=30, deadline=None)

_WORDS = ["rest", "knee", "ice", "water", "run", "pain", "doctor", "the", "a", "hurts", "daily"]
_answer = st.lists(st.sampled_from(_WORDS), max_size=5).map(" ".join)
_ce = st.floats(0, 10, allow_nan=False)


class LongerWins:
    """A symmetric judge: the longer answer wins, equal lengths tie."""

    name = "longer-wins"

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"


def _test_records(n: int, twice: bool) -> list[Record]:
    """``n`` test records; with ``twice`` the first user asks their query a second time (another reference)."""
    recs = [Record(f"u{i}", "runner" if i % 2 else "", [f"I run {i} km", "my knee hurts"], f"Knee {i}?",
                   f"rest the knee and ice it {i}") for i in range(n)]
    if twice:
        recs.insert(n // 2, Record("u0", "", ["I run 0 km", "my knee hurts"], "Knee 0?", "see a doctor about the pain"))
    return recs


def _write(out: Path, seed: int, method: str, test, answers, ces=None, order=None, **info) -> Path:
    """A predictions file as the comparison leaves it: rows (+ response CE) in ``order`` (default: the split's)."""
    path = out / f"seed{seed}" / method / "predictions.json"
    ev._save_predictions(path, method, seed, test, answers, **info)
    data = json.loads(path.read_text())
    for row, ce in zip(data["rows"], ces or []):
        row["response_ce"] = ce
    if order is not None:
        data["rows"] = [data["rows"][i] for i in order]
    path.write_text(json.dumps(data))
    return path


def _keeping_repeats_in_order(test, order):
    """``order`` with the rows of a query asked twice kept in their relative order: the rows carry
    no more than (user, query) to tell them apart, so that is what record_keys promises to map back."""
    pos = {}
    for i, r in enumerate(test):
        pos.setdefault((r.user_id, r.query), []).append(i)
    slots = {k: iter(sorted(v)) for k, v in pos.items()}
    return [next(slots[(test[i].user_id, test[i].query)]) for i in order]


@st.composite
def _comparisons(draw, methods=("tplp", "milp", "uelp", "base")):
    """{seed: (test, {method: (answers, CEs or None, row order)})}, methods missing on some seeds."""
    runs = {}
    for seed in draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True)):
        test = _test_records(draw(st.integers(1, 4)), draw(st.booleans()))
        n = len(test)
        chosen = draw(st.lists(st.sampled_from(methods), max_size=len(methods), unique=True))
        by_method = {}
        for m in chosen:
            same_as = draw(st.sampled_from([None, *by_method]))  # identical answers to a method already drawn
            answers = by_method[same_as][0] if same_as else draw(st.lists(_answer, min_size=n, max_size=n))
            ces = draw(st.one_of(st.none(), st.lists(_ce, min_size=n, max_size=n)))
            if same_as and ces is not None and by_method[same_as][1] is not None:
                ces = list(by_method[same_as][1])
            by_method[m] = (answers, ces, _keeping_repeats_in_order(test, draw(st.permutations(range(n)))))
        runs[seed] = (test, by_method)
    return runs


def _aggregate(runs, seeds=None, methods=("tplp", "milp", "uelp", "base"), judge=None):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for seed, (test, by_method) in runs.items():
            for m, (answers, ces, order) in by_method.items():
                _write(out, seed, m, test, answers, ces, order, trainable_parameters=7)
        seeds = list(runs) if seeds is None else seeds
        return ev.aggregate(out, seeds, {s: {"test": t} for s, (t, _) in runs.items()}, judge or LongerWins(),
                            list(methods))


def _expected_pairs(runs, m, key, ref="milp"):
    """MiLP's and ``m``'s per-example ``key`` scores on the examples both have, the split's order, seeds ascending."""
    a, b = [], []
    for seed in sorted(runs):
        test, by_method = runs[seed]
        if ref not in by_method or m not in by_method:
            continue
        each = {}
        for x in (ref, m):
            answers, ces, _ = by_method[x]
            if key == "response_ce":
                if ces is None:
                    break
                each[x] = list(ces)
            else:
                each[x] = ev._scores_per_example(test, answers)[key]
        else:
            a += each[ref]
            b += each[m]
    return a, b


# --------------------------------------------------------------------------- paired differences
_CE_ROWS_REVERSED = {0: (_test_records(3, False), {
    "milp": (["rest", "knee", "ice"], [1.0, 2.0, 3.0], [0, 1, 2]),
    "tplp": (["rest", "knee", "ice"], [1.0, 2.0, 3.0], [2, 0, 1])})}


@SETTINGS
@given(runs=_comparisons(), data=st.data())
@example(runs=_CE_ROWS_REVERSED, data=None)
def test_paired_differences_pair_each_example_with_itself(runs, data):
    """Was: the response CE of each example was read in the saved rows' order, while every other
    score is in the split's order: a file whose rows were saved in another order (which
    ``_predictions`` accepts) paired one example's loss with another's; two methods with the very
    same losses showed an interval of [−2, +1] instead of a zero difference."""
    seeds = list(runs) if data is None else data.draw(st.permutations(list(runs)))
    res = _aggregate(runs, seeds)
    paired = res["paired"]
    assert paired["reference"] == "milp"
    for m in ("tplp", "uelp", "base"):
        got = paired["methods"].get(m, {})
        for key in ("rouge1", "rougeL", "persona_f1", "response_ce"):
            a, b = _expected_pairs(runs, m, key)
            if not a:
                assert key not in got
                continue
            d = got[key]
            assert d == paired_difference(a, b).to_dict()
            assert d["n"] == len(a) == len(b)
            # MiLP minus the method, as the header says
            assert d["mean"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-9)
            if len(a) > 1:
                assert d["ci_low"] <= d["mean"] <= d["ci_high"] and 0 < d["p_value"] <= 1
            if a == b:  # the same answers (and losses): no difference at all
                assert d["mean"] == 0 and (len(a) == 1 or (d["ci_low"], d["ci_high"], d["p_value"]) == (0, 0, 1))
        if "milp" not in {x for _, by in runs.values() for x in by}:
            assert paired["methods"] == {}


def test_paired_response_ce_regression_rows_saved_in_another_order(tmp_path):
    """Was: MiLP and TpLP with identical answers and losses, TpLP's rows saved in another order:
    Δ response CE 0.000 [−2.000, +1.000] instead of exactly 0 with p 1."""
    test = _test_records(3, False)
    _write(tmp_path, 0, "milp", test, ["a", "b", "c"], [1.0, 2.0, 3.0])
    _write(tmp_path, 0, "tplp", test, ["a", "b", "c"], [1.0, 2.0, 3.0], order=[2, 0, 1])
    d = ev.aggregate(tmp_path, [0], {0: {"test": test}}, LongerWins(), ["tplp", "milp"])["paired"]["methods"]["tplp"]
    assert d["response_ce"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n": 3,
                                "confidence": 0.95}


def test_paired_differences_do_not_depend_on_the_order_of_the_seeds(tmp_path):
    """Was: the examples were pooled in the order the seeds were given, and the seeded bootstrap
    resamples positions: ``--seeds 0,1`` and ``--seeds 1,0`` over the very same predictions
    printed different intervals (Δ ROUGE-1 +10.91 [−0.68, +22.73] vs [−0.68, +24.32])."""
    test = _test_records(4, False)
    answers = {(0, "milp"): ["rest knee", "ice the a", "run", "hurts pain doctor"],
               (0, "tplp"): ["water", "knee daily", "the ice", "rest"],
               (1, "milp"): ["knee ice run", "rest", "doctor", "pain pain"],
               (1, "tplp"): ["a", "rest knee hurts", "ice", "daily water the"]}
    for (seed, m), ans in answers.items():
        _write(tmp_path, seed, m, test, ans)
    splits = {0: {"test": test}, 1: {"test": test}}
    a = ev.aggregate(tmp_path, [0, 1], splits, LongerWins(), ["tplp", "milp"])
    b = ev.aggregate(tmp_path, [1, 0], splits, LongerWins(), ["tplp", "milp"])
    assert a["paired"] == b["paired"]
    assert a["paired"]["methods"]["tplp"]["rouge1"]["n"] == 8


# --------------------------------------------------------------------------- order of seeds and methods
@settings(max_examples=20, deadline=None)
@given(runs=_comparisons(), data=st.data())
def test_tables_do_not_depend_on_the_order_of_seeds_or_methods(runs, data):
    seeds = data.draw(st.permutations(sorted(runs)))
    methods = data.draw(st.permutations(["tplp", "milp", "uelp", "base"]))
    a = _aggregate(runs, sorted(runs))
    b = _aggregate(runs, seeds, methods)
    assert a["per_seed"] == b["per_seed"] and a["paired"] == b["paired"]
    for m in a["summary"]:  # the summary's seed lists follow the given order; the statistics do not
        assert {k: v for k, v in a["summary"][m].items() if k != "seeds"} == \
            {k: v for k, v in b["summary"][m].items() if k != "seeds"}
        assert sorted(b["summary"][m]["seeds"]) == a["summary"][m]["seeds"]
    for rows in ((*ev._MAIN, "base"), ev._ABLATION):
        assert ev._table(rows, a["summary"]) == ev._table(rows, b["summary"])
    assert ev._paired_section(a["paired"]) == ev._paired_section(b["paired"])


# --------------------------------------------------------------------------- cells and their seed counts
def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@settings(max_examples=25, deadline=None)
@given(runs=_comparisons())
def test_every_cell_says_how_many_seeds_it_averages(runs):
    """Was: a cell averaged the seeds that have its metric (the win rate only where TpLP answered
    too, the response CE only where it was computed), while the row's "seeds" column counted the
    seeds that have the method: MiLP on seeds 0 and 1 with TpLP only on seed 0 showed a win rate
    over one seed next to "2" seeds, with nothing telling them apart."""
    summary = _aggregate(runs)["summary"]
    lines = ev._table((*ev._MAIN, "base"), summary)
    header = _cells(lines[0])
    rows = [m for m in (*ev._MAIN, "base") if m in summary]
    assert len(lines) == 2 + len(rows)
    for m, line in zip(rows, lines[2:]):
        cells = _cells(line)
        assert len(cells) == len(header)
        k = len(summary[m]["seeds"])
        assert cells[-1] == str(k)
        for (key, _), cell in zip((*ev._METRICS, ev._CE), cells[1:-1]):
            stat = summary[m].get(key)
            if stat is None:
                assert cell == "—"
                continue
            assert 1 <= stat["n"] <= k
            assert (f"{stat['n']} of {k} seeds" in cell) == (stat["n"] != k)
            assert (" ± " in cell) == (stat["n"] > 1)


def test_cell_seed_count_regression_tplp_missing_on_a_seed(tmp_path):
    """Was: "| MiLP | ... | 50.00 | ... | 2 |": the win rate of one seed read as a mean over two."""
    test = _test_records(2, False)
    _write(tmp_path, 0, "tplp", test, ["rest", "knee"], [1.0, 1.0])
    _write(tmp_path, 0, "milp", test, ["rest", "knee"], [1.0, 1.0])
    _write(tmp_path, 1, "milp", test, ["ice", "run"], [2.0, 2.0])
    summary = ev.aggregate(tmp_path, [0, 1], {s: {"test": test} for s in (0, 1)}, LongerWins(),
                           ["tplp", "milp"])["summary"]
    assert summary["milp"]["win_rate"]["n"] == 1 and summary["milp"]["rouge1"]["n"] == 2
    milp_row = _cells(ev._table(ev._MAIN, summary)[3])
    assert milp_row[0] == "MiLP" and milp_row[-1] == "2"
    assert milp_row[4] == "50.00 (1 of 2 seeds)"
    assert " ± " in milp_row[1] and "seeds" not in milp_row[1]


@settings(max_examples=25, deadline=None)
@given(runs=_comparisons())
def test_every_paired_cell_says_how_many_examples_it_pairs(runs):
    """Was: a row's "n" was the largest count of its cells: a response CE computed on only some
    seeds (--report-only before it was filled in) paired fewer examples than the "n" next to it."""
    paired = _aggregate(runs)["paired"]
    lines = ev._paired_section(paired)
    if not paired["methods"]:
        assert lines == []
        return
    table = [x for x in lines if x.startswith("|")]
    header = _cells(table[0])
    rows = [m for m in (*ev.ALL_METHODS, "base") if m in paired["methods"]]
    assert len(table) == 2 + len(rows) and header[0] == "Method" and header[-1] == "n"
    ns = sorted({d["n"] for diffs in paired["methods"].values() for d in diffs.values()})
    assert f"(n = {', '.join(map(str, ns))} examples)" in "\n".join(lines)
    for m, line in zip(rows, table[2:]):
        cells = _cells(line)
        assert len(cells) == len(header)
        n = int(cells[-1])
        assert n == max(d["n"] for d in paired["methods"][m].values())
        for (key, _), cell in zip(ev._PAIRED, cells[1:-1]):
            d = paired["methods"][m].get(key)
            if d is None:
                assert cell == "—"
                continue
            assert cell.endswith(f"(n {d['n']})") == (d["n"] != n)
            shown = float(cell.split(" ")[0].replace("−", "-"))  # MiLP minus the method, sign included
            assert shown == pytest.approx(d["mean"], abs=0.0051)
            assert cell.startswith("+" if d["mean"] >= 0 else "−")


def test_paired_cell_n_regression_response_ce_on_one_seed_only(tmp_path):
    """Was: "| TpLP | ... | +1.000 [+1.000, +1.000] p 0.5 | 4 |": a CE difference over 2 examples
    in a row of n 4."""
    test = _test_records(2, False)
    _write(tmp_path, 0, "milp", test, ["rest", "knee"], [2.0, 3.0])
    _write(tmp_path, 0, "tplp", test, ["ice", "run"], [1.0, 2.0])
    _write(tmp_path, 1, "milp", test, ["rest", "knee"])
    _write(tmp_path, 1, "tplp", test, ["ice", "run"])
    paired = ev.aggregate(tmp_path, [0, 1], {s: {"test": test} for s in (0, 1)}, LongerWins(),
                          ["tplp", "milp"])["paired"]
    row = _cells(ev._paired_section(paired)[-2])
    assert row[0] == "TpLP" and row[-1] == "4"
    assert row[4] == "+1.000 [+1.000, +1.000] p 0.5 (n 2)" and "(n" not in row[1]


# --------------------------------------------------------------------------- the markdown stays a table
_odd = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.0, 0.0, -0.004, 1e-12, -1e300]))


def _stat(draw, seeds: int):
    n = draw(st.integers(1, seeds))
    return {"mean": draw(_odd), "std": None if n == 1 else draw(st.one_of(_odd, st.just(0.0))), "n": n}


@st.composite
def _reports(draw):
    seeds = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
    methods = draw(st.lists(st.sampled_from([*ev.ALL_METHODS, "base"]), unique=True, max_size=8))
    keys = [k for k, _ in (*ev._METRICS, ev._CE)] + ["memory_parameters_per_user", "search_val_ce"]
    summary = {}
    for m in methods:
        k = draw(st.integers(1, len(seeds)))
        summary[m] = {key: _stat(draw, k) for key in keys if draw(st.booleans())}
        summary[m]["seeds"] = seeds[:k]
        if "memory_parameters_per_user" in summary[m]:
            summary[m]["memory_parameters_per_user"]["mean"] = draw(st.floats(0, 1e8))
    paired = {"reference": "milp", "methods": {}}
    if "milp" in summary:
        for m in methods:
            if m == "milp" or not draw(st.booleans()):
                continue
            diffs = {}
            for key, _ in ev._PAIRED:
                if draw(st.booleans()):
                    n = draw(st.integers(1, 30))
                    lo, hi = sorted([draw(_odd), draw(_odd)]) if n > 1 and draw(st.booleans()) else (None, None)
                    p = None if lo is None else draw(st.floats(1e-9, 1))
                    diffs[key] = {"mean": draw(_odd), "ci_low": lo, "ci_high": hi, "p_value": p, "n": n,
                                  "confidence": 0.95}
            if diffs:
                paired["methods"][m] = diffs
    cost = {m: {"trainable_parameters": draw(st.one_of(st.none(), st.integers(0, 10**9))),
                "memory_parameters_per_user": draw(st.one_of(st.none(), st.integers(0, 10**7))),
                "memory_parameters_per_user_per_seed": draw(st.one_of(st.none(), st.lists(st.integers(0, 10**7),
                                                                                          max_size=3))),
                "wall_s": draw(st.one_of(st.none(), st.floats(0, 1e6))), "wall_s_total": 0.0} for m in methods}
    settings_ = {"users": 20, "instruct_steps": 8, "batch_size": 8, "instruct_lr": 5e-4, "instruct_rank": 16,
                 "max_new_tokens": 48, "context_tokens": 256, "k_long": 3, "k_short": 2, "uelp_vectors": 4,
                 "search": 8, "modules": 2, "rank": 8}
    return {"command": "python -m milp.evaluate", "data": "d", "model": "m", "seeds": seeds,
            "split_sizes": {str(s): {"train": 14, "val": 2, "test": 4} for s in seeds}, "settings": settings_,
            "memory": "x", "judge": "j", "summary": summary, "paired": paired, "cost": cost,
            "compute_s": 60.0, "wall_s": 61.0}


@settings(max_examples=40, deadline=None)
@given(report=_reports())
def test_markdown_tables_keep_their_columns_whatever_the_values(report):
    md = ev._markdown(report)
    block: list[str] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            widths = {len(_cells(x)) for x in block}
            assert len(widths) == 1, block
            assert re.fullmatch(r"\|---\|(---:\|)+", block[1]), block[1]
            assert all(x.endswith("|") for x in block)
        block = []
    for m, c in report["cost"].items():
        row = next(x for x in md.splitlines() if x.startswith(f"| {ev.LABELS[m]} | ") and x.count("|") == 4)
        wall = _cells(row)[2]
        assert wall == ("—" if c["wall_s"] is None else f"{c['wall_s']:.0f}")


# --------------------------------------------------------------------------- win rate and cost
class AlwaysTie:
    name = "always-tie"

    def judge(self, query, context, answer_a, answer_b, reference=None):
        return "tie"


@settings(max_examples=20, deadline=None)
@given(runs=_comparisons(), tie=st.booleans())
def test_win_rate_counts_each_verdict_once_ties_half(runs, tie):
    res = _aggregate(runs, judge=AlwaysTie() if tie else LongerWins())
    for seed, (test, by_method) in runs.items():
        for m, got in res["per_seed"].get(str(seed), {}).items():
            if "tplp" not in by_method:
                assert "win_rate" not in got
                continue
            assert got["wins"] + got["losses"] + got["ties"] == len(test)
            assert got["win_rate"] == pytest.approx(100 * (got["wins"] + got["ties"] / 2) / len(test))
            if tie or m == "tplp":  # a tie judge, or TpLP against itself: 50 exactly
                assert (got["win_rate"], got["ties"]) == (50.0, len(test))


_timings = st.one_of(st.none(), st.dictionaries(st.sampled_from(["train_s", "generate_s", "memory_s"]),
                                                st.floats(0, 1e4), min_size=1))


@settings(max_examples=30, deadline=None)
@given(per_seed=st.dictionaries(st.integers(0, 5), st.tuples(_timings, st.one_of(st.none(), st.integers(0, 10**6))),
                                min_size=1, max_size=4))
@example(per_seed={0: ({"train_s": 500.0}, None), 1: (None, None)})
def test_cost_wall_time_averages_the_seeds_that_recorded_it(per_seed):
    """Was: a seed whose predictions record no timings counted as 0 s: MiLP timed at 500 s on
    seed 0 and untimed on seed 1 showed "250" seconds per seed."""
    test = _test_records(1, False)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for seed, (timings, mem) in per_seed.items():
            info = {"trainable_parameters": 5}
            if timings is not None:
                info["timings_s"] = timings
            if mem is not None:
                info["memory_parameters_per_user"] = mem
            _write(out, seed, "milp", test, ["rest"], **info)
        cost = ev._cost(out, [*per_seed, 99], ["milp", "tplp"])  # seed 99 and TpLP have nothing
    assert set(cost) == {"milp"}
    c = cost["milp"]
    timed = [sum(t.values()) for t, _ in per_seed.values() if t is not None]
    if timed:
        assert c["wall_s"] == pytest.approx(sum(timed) / len(timed))
    else:  # nothing timed (the base row: its answers come from the MiLP run)
        assert c["wall_s"] == 0
    assert c["wall_s_total"] == pytest.approx(sum(timed))
    mems = [x for _, x in per_seed.values() if x is not None]
    assert c["memory_parameters_per_user_per_seed"] == (mems or None)
    assert c["memory_parameters_per_user"] == (round(sum(mems) / len(mems)) if mems else None)
    assert c["trainable_parameters"] == 5


@settings(max_examples=20, deadline=None)
@given(params=st.lists(st.one_of(st.none(), st.integers(0, 10**6)), min_size=1, max_size=4))
@example(params=[1000, None])
def test_cost_trainable_parameters_come_from_every_seed(params):
    """Was: the cost row took the last seed's ``trainable_parameters``: a seed that recorded none
    blanked the others ("—"), and seeds that differed showed one of them as if all had it."""
    test = _test_records(1, False)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for seed, n in enumerate(params):
            _write(out, seed, "milp", test, ["rest"], **({} if n is None else {"trainable_parameters": n}))
        c = ev._cost(out, range(len(params)), ["milp"])["milp"]
    have = [n for n in params if n is not None]
    assert c["trainable_parameters"] == (round(sum(have) / len(have)) if have else None)
    assert c["trainable_parameters_per_seed"] == (have if len(set(have)) > 1 else None)


# --------------------------------------------------------------------------- the statistics themselves
_score = st.sampled_from([0.0, 12.5, 25.0, 40.0, 50.0, 66.66666666666667, 100.0])  # ROUGE-like: many ties


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(_score, _score), min_size=1, max_size=30))
def test_paired_difference_interval_holds_the_mean_and_p_in_range(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    d = paired_difference(a, b, n_resamples=2000)
    assert d.n == len(pairs)
    assert d.mean == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-9)
    if len(pairs) == 1:
        assert (d.ci_low, d.ci_high, d.p_value) == (None, None, None)
        return
    assert d.ci_low <= d.mean + 1e-9 and d.mean - 1e-9 <= d.ci_high
    assert 0 < d.p_value <= 1
    if a == b:
        assert (d.ci_low, d.ci_high, d.p_value) == (0.0, 0.0, 1.0)
    cell = ev._diff_cell(d.to_dict(), 2)
    shown = float(cell.split(" ")[0].replace("−", "-"))
    assert shown == pytest.approx(d.mean, abs=0.005 + 1e-9)
    assert "-" not in cell.split(" p ")[0]  # minus signs as U+2212, the p-value untouched
    assert cell.endswith(f"p {d.p_value:.2g}") and not math.isnan(shown)
