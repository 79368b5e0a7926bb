"""Property-based and state-machine tests of the search loop: ask/tell, the trial log, resume.

The Bayesian step is replaced by a cheap deterministic stand-in (:func:`fake_bo`) where only
the loop's bookkeeping is under test; one test runs the real ``"gp"`` surrogate.
"""
from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from search_helpers import TINY_ACQ, TINY_NUTS

import search.loop
import search.trial_log
from search import BoxSpace, Objective, Search, SearchSpace, ffn_target_shapes
from search.trial_log import decode_float

# A small space with many equivalent configurations (n = 0, or no layer on), so the design
# repeats itself and the de-duplication paths run: 3 layer bits, n in 0..2, r in {8, 16}.
SPACE = SearchSpace(3, modules=(0, 2), ranks=(8, 16), target_shapes=ffn_target_shapes(3, 4, 8))
OBJECTIVES = [Objective("val_ce", "minimize"), SPACE.parameter_count_objective()]


def fake_bo(self, k, seed):
    """Deterministic stand-in for the Bayesian round: ``k`` grid points drawn from ``seed``."""
    g = torch.Generator().manual_seed(1000 + seed)
    return [self.space.snap(r) for r in torch.rand(k, self.space.dim, generator=g, dtype=torch.float64).tolist()]


def loss(c) -> float:
    return 2.0 - 0.1 * sum(c.effective_modules) - 0.01 * c.ranks[0]


def score(configs):
    return [{"val_ce": loss(c)} for c in configs]


def make(log, **kw):
    kw.setdefault("q", 3)
    kw.setdefault("n_init", 6)
    kw.setdefault("surrogate", "gp")
    kw.setdefault("nuts", TINY_NUTS)
    kw.setdefault("acquisition", TINY_ACQ)
    return Search(kw.pop("space", SPACE), kw.pop("objectives", OBJECTIVES), log_path=log, **kw)


def quiet(fn, *a, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    return out, [str(x.message) for x in w]


def summary(s):
    return [
        (t.trial_id, t.round, t.status, t.source, t.seed, t.design_index, t.x, t.config,
         tuple(sorted((k, repr(v)) for k, v in t.values.items())), json.dumps(t.metrics, sort_keys=True))
        for t in s.trials
    ]


def check_trial(s, t):
    assert s.space.snap(t.x) == t.x and s.space.decode(t.x) == t.config
    if t.status != "pending":
        assert set(t.values) == set(s.names)
        assert t.values["parameters"] == s.space.parameter_count(t.config)
        assert t.ok == all(math.isfinite(v) for v in t.values.values())


# ------------------------------------------------------------------------- state machine
class SearchMachine(RuleBasedStateMachine):
    """Random interleavings of ask, tell (ok / NaN / inf / None, extra metrics), process
    crashes (a new ``Search`` on the same log) and interrupted log writes (the last line cut
    at a random byte), checked against a plain model of what was told."""

    @initialize()
    def start(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.log = self.dir / "trials.jsonl"
        self.s = make(self.log)
        self.told = {}  # trial id -> (config, x, status, values of the evaluated objective, metrics)

    def teardown(self):
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    @rule(n=st.integers(1, 4))
    def ask(self, n):
        before = {t.trial_id for t in self.s.pending} | set(self.told)
        trials = self.s.ask(n)
        assert len(trials) <= n
        ids = [t.trial_id for t in trials]
        assert ids == sorted(ids) and not set(ids) & before and all(t.status == "pending" for t in trials)

    @precondition(lambda self: self.s.pending)
    @rule(
        data=st.data(),
        value=st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, None])),
        extra=st.dictionaries(st.sampled_from(["rouge", "note", "flag"]),
                              st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=4), st.none()),
                              max_size=2),
    )
    def tell(self, data, value, extra):
        t = data.draw(st.sampled_from(self.s.pending))
        done = self.s.tell(t, {"val_ce": value, **extra})
        want_ok = value is not None and math.isfinite(value)
        assert done.status == ("ok" if want_ok else "failed")
        self.told[t.trial_id] = (done.config, done.x, done.status, done.values["val_ce"], dict(done.metrics))

    @rule()
    def tell_twice_or_unknown(self):
        if self.told:
            with pytest.raises(ValueError, match="already told"):
                self.s.tell(next(iter(self.told)), [1.0])
        with pytest.raises(ValueError, match="unknown"):
            self.s.tell(10_000, [1.0])

    @rule()
    def crash_and_resume(self):
        before = summary(self.s)
        self.s, warned = quiet(make, self.log)
        assert all("skipping corrupt" in m for m in warned) and not self.s.pending
        assert summary(self.s) == before  # every told trial is back, exactly

    @precondition(lambda self: self.told)
    @rule(data=st.data())
    def interrupted_write_then_resume(self, data):
        raw = self.log.read_bytes()
        start = raw.rstrip(b"\n").rfind(b"\n") + 1
        try:
            last = json.loads(raw[start:])
        except ValueError:  # the last line is what an earlier cut left: nothing to cut
            return
        # the last record's write was cut short (drawn as a fraction: record lengths vary with the clock)
        frac = data.draw(st.integers(0, 1000))
        cut = start + (len(raw) - 1 - start) * frac // 1000
        self.log.write_bytes(raw[:cut])
        self.s, warned = quiet(make, self.log)
        if last.get("type") == "trial" and cut < len(raw) - 1:
            self.told.pop(last["trial_id"])  # its line is incomplete: that trial was never told
            if cut > start:
                assert any("skipping corrupt" in m for m in warned)
        assert self.log.read_bytes().endswith(b"\n")

    @invariant()
    def consistent(self):
        s = self.s
        assert s.n_finished == len(self.told) and [t.trial_id for t in s.trials] == sorted(self.told)
        for t in s.trials:
            config, x, status, v, metrics = self.told[t.trial_id]
            assert (t.config, t.x, t.status, t.metrics) == (config, x, status, metrics)
            assert repr(t.values["val_ce"]) == repr(v)
            check_trial(s, t)
        everything = s.trials + s.pending
        keys = [s.space.canonical(t.config) for t in everything]
        assert len(keys) == len(set(keys)), "a configuration was asked twice"
        design = [t.design_index for t in everything if t.design_index is not None]
        assert len(design) == len(set(design)), "a design point was asked twice"
        assert len({t.trial_id for t in everything}) == len(everything)
        assert s.n_failed == sum(1 for v in self.told.values() if v[2] == "failed")
        recs, _ = quiet(lambda: [r for _, r in search.trial_log.read_log(self.log)])
        assert [r["type"] for r in recs].count("header") == 1 and recs[0]["type"] == "header"
        assert all(t.ok for t in s.pareto_front())


def test_search_state_machine(monkeypatch):
    monkeypatch.setattr(search.loop.Search, "_bo_candidates", fake_bo)
    run_state_machine_as_test(
        SearchMachine,
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


# ------------------------------------------------------------------------- resume == uninterrupted
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    q=st.integers(1, 4),
    n_init=st.integers(0, 12),
    budget=st.integers(1, 16),
    stops=st.lists(st.integers(1, 5), max_size=3),
)
def test_a_search_stopped_and_resumed_asks_what_an_uninterrupted_one_asks(monkeypatch, seed, q, n_init, budget, stops):
    monkeypatch.setattr(search.loop.Search, "_bo_candidates", fake_bo)
    kw = dict(q=q, n_init=n_init, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        full, _ = quiet(lambda: make(d / "a.jsonl", **kw).run(score, budget, progress=False))
        for n in sorted({k * q for k in stops}) + [budget]:  # stopped after whole rounds; a new process each time
            part, _ = quiet(lambda n=n: make(d / "b.jsonl", **kw).run(score, min(n, budget), progress=False))
    assert [row[:8] for row in summary(part)] == [row[:8] for row in summary(full)]
    assert part.n_finished == full.n_finished


def test_design_repeats_do_not_change_what_a_resumed_search_asks(monkeypatch, tmp_path):
    """Regression: a design point skipped as a repeat was remembered only in memory, so a
    resumed search (same log, same settings) counted it again against the round's ``n``,
    filled the round with a Bayesian candidate and asked other trials than the search that
    never stopped; the uninterrupted one also started Bayesian rounds while design points
    were left."""
    monkeypatch.setattr(search.loop.Search, "_bo_candidates", fake_bo)
    d = tmp_path
    full = make(d / "a.jsonl", q=3, n_init=12, seed=0).run(score, 15, progress=False)
    for n in (3, 6, 9, 12, 15):
        part = make(d / "b.jsonl", q=3, n_init=12, seed=0).run(score, n, progress=False)
    assert [row[:8] for row in summary(part)] == [row[:8] for row in summary(full)]
    # the design (12 Sobol points, some repeats) is used up before any Bayesian candidate
    sources = [t.source for t in full.trials]
    first_bo = sources.index("gp")
    design = [t.design_index for t in full.trials[:first_bo]]
    skipped = set(range(12)) - set(design)
    assert all(SPACE.canonical(SPACE.decode(full._sobol_point(i))) in
               {SPACE.canonical(t.config) for t in full.trials[:first_bo]} for i in skipped)


def test_resume_with_the_real_gp_matches_an_uninterrupted_run(tmp_path):
    kw = dict(q=1, n_init=3, seed=5)
    full = make(tmp_path / "a.jsonl", **kw).run(score, 4, progress=False)
    for n in (3, 4):  # stopped after whole rounds
        part = make(tmp_path / "b.jsonl", **kw).run(score, n, progress=False)
    assert any(t.source == "gp" for t in full.trials)
    assert [row[:8] for row in summary(part)] == [row[:8] for row in summary(full)]


# ------------------------------------------------------------------------- a log edited or damaged
def a_log(tmp_path, n=5):
    log = tmp_path / "trials.jsonl"
    if log.exists():
        log.unlink()
    make(log, n_init=8).run(lambda cs: [{"val_ce": loss(c), "rouge": 0.5} for c in cs], n, progress=False)
    return log


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**400), 10**400), st.floats(), st.text(max_size=6),
              st.sampled_from(["nan", "inf", "-inf", "ok", "failed", "trial", "header", 10**400, -(10**400),
                               math.inf, -math.inf, math.nan, 2**63, -1, 0.5, True])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
FIELDS = ["trial_id", "round", "status", "config", "x", "objectives", "metrics", "source", "seed",
          "design_index", "elapsed_s", "timestamp", "type"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mangled_trial_record_is_loaded_or_skipped_never_raised(tmp_path, monkeypatch, data):
    """Whatever a trial line holds, opening the log loads it as a valid trial or skips it
    with a warning; every other trial is kept."""
    monkeypatch.setattr(search.loop.Search, "_bo_candidates", fake_bo)
    log = a_log(tmp_path)
    lines = log.read_text().splitlines()
    i = data.draw(st.integers(1, len(lines) - 1))
    rec = json.loads(lines[i])
    field = data.draw(st.sampled_from(FIELDS))
    where, path = rec, (field,)  # the field itself, or one entry inside it
    if isinstance(rec.get(field), (dict, list)) and rec[field] and data.draw(st.booleans()):
        where, field = rec[field], data.draw(st.sampled_from(sorted(rec[field]) if isinstance(rec[field], dict)
                                                             else range(len(rec[field]))))
        path += (field,)
    old = where.get(field) if isinstance(where, dict) else where[field]
    if isinstance(where, dict) and data.draw(st.booleans()):
        where.pop(field)
    else:
        where[field] = data.draw(json_values)
    lines[i] = json.dumps(rec)  # NaN/Infinity literals included (Python's json reads them)
    log.write_text("\n".join(lines) + "\n")
    if path == ("objectives", "parameters") and field in where and where[field] != old:
        # a known objective's value is computed: a log that disagrees is another search's
        try:
            decode_float(where[field])
        except ValueError:
            pass  # not a number at all: an invalid record, skipped
        else:  # a finite value unlike the computed one (not finite: an ok record is invalid, a failed one lacks it)
            new = decode_float(where[field])
            if math.isfinite(new) and not math.isclose(new, old, rel_tol=1e-9):
                with pytest.raises(ValueError, match="different search.*parameters"):
                    make(log, n_init=8)
                return
    s, warned = quiet(make, log, n_init=8)
    ids = [t.trial_id for t in s.trials]
    assert len(ids) in (4, 5) and len(set(ids)) == len(ids)
    assert len(ids) == 5 or warned
    for t in s.trials:
        check_trial(s, t)
    s.run(score, 7, progress=False)  # and the search goes on
    assert s.n_finished == 7


def test_huge_numbers_in_a_trial_record_are_skipped_not_raised(tmp_path):
    """Regression: ``float()`` of a JSON integer beyond float range (or ``int()`` of an
    ``Infinity`` seed) raised ``OverflowError`` out of ``Search(...)`` instead of the record
    being skipped with a warning like every other invalid record."""
    log = a_log(tmp_path, n=3)
    lines = log.read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    recs[0]["objectives"]["val_ce"] = 10**400
    recs[1]["seed"] = math.inf
    recs[2]["x"] = [10**400] + recs[2]["x"][1:]
    log.write_text("\n".join([lines[0]] + [json.dumps(r) for r in recs]) + "\n")
    with pytest.warns(UserWarning, match="skipping invalid trial record") as w:
        s = make(log, n_init=8)
    assert s.n_finished == 0 and len([x for x in w if "invalid trial record" in str(x.message)]) == 3


@pytest.mark.parametrize("content", [b"", b"\n\n", b"   \n", b'{"type":"head'])
def test_empty_or_headless_log_starts_a_fresh_search(tmp_path, content):
    log = tmp_path / "trials.jsonl"
    log.write_bytes(content)
    s, warned = quiet(make, log)
    assert s.n_finished == 0 and bool(warned) == content.startswith(b"{")
    s.run(score, 4, progress=False)
    s2, _ = quiet(make, log)
    assert summary(s2) == summary(s)
    recs, _ = quiet(lambda: [r for _, r in search.trial_log.read_log(log)])
    assert [r["type"] for r in recs] == ["header"] + ["trial"] * 4


def test_unknown_keys_are_kept_out_and_unknown_record_types_skipped(tmp_path):
    log = a_log(tmp_path, n=3)
    lines = log.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["from_the_future"] = {"a": 1}  # an extra key: the record still loads
    lines[1] = json.dumps(rec)
    lines.append(json.dumps({"type": "note", "text": "hello"}))
    log.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="unknown type 'note'"):
        s = make(log, n_init=8)
    assert s.n_finished == 3 and s.trials[0].metrics == {"rouge": 0.5}
    t = s.ask(1)[0]
    with pytest.raises(TypeError, match="keys must be str"):
        s.tell(t, {"val_ce": 1.0, 3: 1.0})
    assert t in s.pending


def test_a_log_of_other_target_shapes_is_refused(tmp_path):
    """Regression: the space's description has no target shapes, so a log written for
    another model's shapes (same layer count) was resumed with the old parameter counts:
    ``select(..., then="parameters")`` then ranked configurations by stale counts."""
    log = a_log(tmp_path, n=3)
    other = SearchSpace(3, modules=(0, 2), ranks=(8, 16), target_shapes=ffn_target_shapes(3, 16, 32))
    with pytest.raises(ValueError, match="different search.*parameters"):
        make(log, n_init=8, space=other, objectives=[OBJECTIVES[0], other.parameter_count_objective()])
    s = make(log, n_init=8)  # the same shapes still resume
    assert s.n_finished == 3


# ------------------------------------------------------------------------- box space
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bounds=st.lists(st.tuples(st.floats(-5, 5), st.floats(0.01, 5)).map(lambda b: (b[0], b[0] + b[1])),
                    min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_box_space_trials_are_in_the_box_and_resume(tmp_path, bounds, seed):
    space = BoxSpace(bounds)
    objs = [Objective("a"), Objective("b", "maximize")]
    log = tmp_path / f"box{seed}.jsonl"
    if log.exists():
        log.unlink()
    f = lambda cs: [[sum(c), c[0]] for c in cs]  # noqa: E731
    s = Search(space, objs, q=2, n_init=6, seed=seed, log_path=log).run(f, 6, progress=False)
    for t in s.trials:
        assert all(lo <= v <= hi for v, (lo, hi) in zip(t.config, space.bounds))
        assert space.encode(t.config) == pytest.approx(t.x, abs=1e-9)
    s2, warned = quiet(Search, space, objs, q=2, n_init=6, seed=seed, log_path=log)
    assert not warned and summary(s2) == summary(s)


def test_box_space_candidate_on_the_upper_bound_is_asked(monkeypatch):
    """Regression: ``BoxSpace.decode([1.0])`` gave a point past ``hi`` (-0.1 + 0.30000000000000004),
    so ``ask`` crashed with "outside the bounds" when a candidate sat on the box's edge (where
    the acquisition optimiser often puts them)."""
    monkeypatch.setattr(search.loop.Search, "_bo_candidates", lambda self, k, seed: [(1.0,)] * k)
    s = Search(BoxSpace([(-0.1, 0.2)]), [Objective("a"), Objective("b")], q=1, n_init=2)
    for _ in range(2):
        t = s.ask()[0]
        s.tell(t, [t.config[0], -t.config[0]])
    (t,) = s.ask()
    assert t.source == "saas" and t.config == (0.2,)


# ------------------------------------------------------------------------- results
small = st.integers(-4, 4).map(float)  # few values: ties and near-ties are common


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.one_of(small, st.floats(-5, 5), st.just(math.nan)), st.one_of(small, st.floats(-5, 5))),
        min_size=1, max_size=8),
    tolerance=st.floats(0, 2),
    primary=st.sampled_from(["a", "b"]),
    then=st.sampled_from([None, "a", "b"]),
)
@example(values=[(1.0, 0.0), (1.5, 1.0)], tolerance=1.0, primary="a", then="a")  # near holds two
@example(values=[(1.0, 0.0), (1.5, 1.0)], tolerance=1.0, primary="a", then="b")
def test_select_front_and_hypervolume_follow_their_rules(values, tolerance, primary, then):
    objs = [Objective("a", "minimize"), Objective("b", "maximize")]
    s = Search(BoxSpace([(0.0, 1.0)]), objs, q=len(values), n_init=len(values), ref_point=[6.0, -6.0])
    for t, v in zip(s.ask(), values):
        s.tell(t, v)
    ok = [t for t in s.trials if t.ok]
    front = s.pareto_front()
    sign = {"a": -1.0, "b": 1.0}

    def dominates(u, w):
        return all(sign[n] * u.values[n] >= sign[n] * w.values[n] for n in "ab") and any(
            sign[n] * u.values[n] > sign[n] * w.values[n] for n in "ab")

    assert front == [t for t in ok if not any(dominates(u, t) for u in ok)]
    trace = s.hypervolume_trace()
    # non-decreasing (pareto.hypervolume_trace once dropped by an ulp)
    assert len(trace) == s.n_finished
    assert trace == sorted(trace)
    assert trace[-1] == pytest.approx(s.hypervolume(), abs=1e-12)
    if not ok:
        with pytest.raises(ValueError, match="no successful trial"):
            s.select(primary)
        return
    pick = s.select(primary, tolerance=tolerance, then=then)
    best = max(sign[primary] * t.values[primary] for t in front)
    near = [t for t in front if sign[primary] * t.values[primary] >= best - tolerance * max(abs(best), 1e-12)]
    assert pick in near
    key = then or ("b" if primary == "a" else "a")
    assert sign[key] * pick.values[key] == max(sign[key] * t.values[key] for t in near)
