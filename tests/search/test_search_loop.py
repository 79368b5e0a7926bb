"""Ask/tell, the run loop, the trial log (resume, corruption), failed trials, bad input."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from search_helpers import TINY_ACQ, TINY_NUTS, toy_loss

import search.loop
import search.surrogate
from search import BoxSpace, LoRAConfig, Objective, Search, paper_space, run
from search.surrogate import AcquisitionSettings, NUTSSettings


def make(space, objectives, **kw):
    kw.setdefault("surrogate", "gp")
    kw.setdefault("nuts", TINY_NUTS)
    kw.setdefault("acquisition", TINY_ACQ)
    return Search(space, objectives, **kw)


def lora_round(configs):
    return [{"val_ce": toy_loss(c)} for c in configs]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------- ask / tell
def test_ask_tell_sobol_design(lora_space, lora_objectives):
    s = make(lora_space, lora_objectives, q=3, n_init=6)
    a = s.ask()
    assert [t.trial_id for t in a] == [0, 1, 2] and all(t.status == "pending" for t in a)
    assert [t.design_index for t in a] == [0, 1, 2] and {t.source for t in a} == {"sobol"}
    for t in a:
        assert t.config == lora_space.decode(t.x) and lora_space.snap(t.x) == t.x
    b = s.ask()  # a second round may be asked before the first is told
    assert [t.design_index for t in b] == [3, 4, 5] and len(s.pending) == 6
    for t in a + b:
        done = s.tell(t, {"val_ce": toy_loss(t.config)})
        assert done.ok and done.values["parameters"] == lora_space.parameter_count(t.config)
    assert s.n_finished == 6 and not s.pending


@pytest.mark.parametrize("surrogate", ["gp", "saas"])
def test_bayesian_round_on_the_lora_space(monkeypatch, lora_space, lora_objectives, surrogate):
    from botorch.models import SingleTaskGP
    from botorch.models.fully_bayesian import SaasFullyBayesianSingleTaskGP

    fitted = []

    def spy(X, Y, **kw):
        fitted.append((kw, search.surrogate.fit_surrogate(X, Y, **kw)))
        return fitted[-1][1]

    monkeypatch.setattr(search.loop, "fit_surrogate", spy)
    s = make(lora_space, lora_objectives, q=3, n_init=6, surrogate=surrogate, seed=1)
    s.run(lora_round, 6, progress=False)
    trials = s.ask()
    # the flag picks the model: the cheap SingleTaskGP fallback or the SAAS-GP; one model
    # (the loss: the parameter count is known, not modelled), on the effective inputs
    (kw, model), = fitted
    want = SingleTaskGP if surrogate == "gp" else SaasFullyBayesianSingleTaskGP
    assert kw["kind"] == surrogate and len(model.models) == 1 and type(model.models[0]) is want
    assert isinstance(model.models[0].input_transform, search.surrogate.EffectiveInput)
    assert len(trials) == 3
    assert {t.source for t in trials} <= {surrogate, "sobol"} and any(t.source == surrogate for t in trials)
    keys = [lora_space.canonical(t.config) for t in s.trials + trials]
    assert len(set(keys)) == len(keys), "a round must not repeat a scored configuration"
    for t in trials:  # candidates are exact grid points
        assert lora_space.snap(t.x) == t.x
        s.tell(t, {"val_ce": toy_loss(t.config)})
    assert s.n_finished == 9


@pytest.mark.parametrize("dims", ["num", "size", "layers", "num,size", "num,layers", "size,layers"])
def test_bayesian_round_on_the_search_space_ablations(dims):
    """Paper Table 4: the dimensions not searched are held (modules 2, rank 16, every layer on);
    the optimiser proposes exact grid points of what is left, never repeating a configuration."""
    from search import ffn_target_shapes

    on = set(dims.split(","))
    space = paper_space(8, modules=(0, 32) if "num" in on else (2, 2),
                        ranks=(8, 16, 32, 64, 96) if "size" in on else (16,),
                        search_layers="layers" in on, target_shapes=ffn_target_shapes(8, 64, 128))
    s = make(space, [Objective("val_ce", "minimize"), space.parameter_count_objective()], q=2, n_init=4, seed=0)
    if dims == "size":  # five configurations: the search stops when it has seen them all
        with pytest.warns(UserWarning, match="no configuration left"):
            s.run(lora_round, 6, progress=False)
        assert s.n_finished == 5 and {t.config.ranks[0] for t in s.trials} == {8, 16, 32, 64, 96}
        assert s.ask() == []
    else:
        s.run(lora_round, 6, progress=False)
        assert s.n_finished == 6 and any(t.source == "gp" for t in s.trials)
    for t in s.trials:
        c = t.config
        assert space.snap(t.x) == t.x
        assert "num" in on or set(c.modules) == {2}
        assert "size" in on or set(c.ranks) == {16}
        assert "layers" in on or all(c.layer_mask)
    keys = [space.canonical(t.config) for t in s.trials]
    assert len(set(keys)) == len(keys)


def test_bayesian_round_on_a_box_space():
    space = BoxSpace([(0.0, 1.0)] * 3)
    objs = [Objective("f0"), Objective("f1")]
    f = lambda cs: [[c[0], 1.0 - c[0] ** 0.5 + c[1] ** 2] for c in cs]  # noqa: E731
    s = make(space, objs, q=2, n_init=5, ref_point=[1.1, 2.1]).run(f, 9, progress=False)
    assert s.n_finished == 9 and {t.source for t in s.trials[5:]} <= {"gp", "sobol"}
    assert 0.0 < s.hypervolume() <= 1.1 * 2.1


def test_tell_accepts_sequences_and_keeps_extra_metrics(tmp_path, lora_space, lora_objectives):
    log = tmp_path / "log.jsonl"
    s = make(lora_space, lora_objectives, q=2, n_init=4, log_path=log)
    t0, t1 = s.ask()
    s.tell(t0, [1.5])
    s.tell(t1.trial_id, {"val_ce": torch.tensor(1.25), "rouge1": 0.4, "note": "ok", "parameters": -1})
    recs = read_lines(log)
    assert recs[0]["type"] == "header" and [r["trial_id"] for r in recs[1:]] == [0, 1]
    assert recs[2]["metrics"] == {"rouge1": 0.4, "note": "ok"}
    # known objectives are always computed, whatever the caller passes
    assert recs[2]["objectives"]["parameters"] == lora_space.parameter_count(t1.config)
    assert recs[2]["config"] == t1.config.to_dict() and recs[2]["x"] == list(t1.x)
    for key in ("status", "round", "seed", "source", "elapsed_s", "timestamp", "design_index"):
        assert key in recs[2]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_non_finite_values_are_failed_trials_never_fed_to_the_surrogate(tmp_path, monkeypatch, bad):
    space = BoxSpace([(0.0, 1.0)] * 2)
    objs = [Objective("a"), Objective("b", "maximize")]
    calls = {"n": 0}

    def f(cs):
        out = []
        for c in cs:
            calls["n"] += 1
            out.append({"a": bad if calls["n"] % 3 == 0 else c[0], "b": c[1]})
        return out

    seen = []
    real_fit = search.surrogate.fit_surrogate

    def spy(X, Y, **kw):
        seen.append((X.clone(), Y.clone()))
        return real_fit(X, Y, **kw)

    monkeypatch.setattr(search.loop, "fit_surrogate", spy)
    log = tmp_path / "log.jsonl"
    s = make(space, objs, q=2, n_init=6, log_path=log).run(f, 10, progress=False)
    assert s.n_finished == 10 and s.n_failed == 3
    assert seen and all(torch.isfinite(Y).all() for _, Y in seen)
    n_ok_before = [X.shape[0] for X, _ in seen]
    assert n_ok_before[0] == 4  # 6 Sobol trials, 2 of them failed
    recs = [r for r in read_lines(log) if r["type"] == "trial"]
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 3
    assert all(r["objectives"]["a"] in ("nan", "inf", "-inf") for r in failed)
    assert all(t.ok for t in s.pareto_front())
    # the failed trials survive a reload as failed trials
    s2 = make(space, objs, q=2, n_init=6, log_path=log)
    assert s2.n_failed == 3 and s2.n_finished == 10


# ------------------------------------------------------------------------- resume
class Killed(Exception):
    pass


def counting(fn, limit=None, batched=True):
    """Wrap a (batched) objective; raise ``Killed`` on call ``limit`` (simulates a kill)."""
    state = {"calls": 0, "configs": []}

    def wrapped(arg):
        state["calls"] += 1
        if limit is not None and state["calls"] == limit:
            raise Killed
        cs = arg if batched else [arg]
        state["configs"] += list(cs)
        out = fn(cs)
        return out if batched else out[0]

    return wrapped, state


@pytest.mark.parametrize("batched", [True, False])
def test_killed_search_resumes_with_exactly_the_planned_trials(tmp_path, lora_space, lora_objectives, batched):
    log = tmp_path / "trials.jsonl"
    planned = 13
    f1, st1 = counting(lora_round, limit=4 if batched else 8, batched=batched)
    s1 = make(lora_space, lora_objectives, q=3, n_init=5, log_path=log, seed=3)
    with pytest.raises(Killed):
        s1.run(f1, planned, batched=batched, progress=False)
    k = s1.n_finished
    assert k == len(st1["configs"]) and 0 < k < planned
    del s1

    f2, st2 = counting(lora_round, batched=batched)
    s2 = make(lora_space, lora_objectives, q=3, n_init=5, log_path=log, seed=3)
    assert s2.n_finished == k  # finished trials loaded, not re-evaluated
    s2.run(f2, planned, batched=batched, progress=False)
    assert s2.n_finished == planned
    assert len(st1["configs"]) + len(st2["configs"]) == planned  # no evaluation repeated
    recs = [r for r in read_lines(log) if r["type"] == "trial"]
    assert sorted(r["trial_id"] for r in recs) == list(range(planned))
    design = [r["design_index"] for r in recs if r["design_index"] is not None]
    assert len(design) == len(set(design))
    keys = [lora_space.canonical(LoRAConfig.from_dict(r["config"])) for r in recs]
    assert len(set(keys)) == len(keys)

    # running again with the same budget does nothing
    f3, st3 = counting(lora_round)
    make(lora_space, lora_objectives, q=3, n_init=5, log_path=log, seed=3).run(f3, planned, progress=False)
    assert st3["calls"] == 0


KILLED_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {helpers!r})
from search_helpers import TINY_ACQ, TINY_NUTS, lora_objectives_for, lora_space_small, toy_loss
from search import Search

space = lora_space_small()
calls = 0

def score(configs):
    global calls
    calls += 1
    if calls == {kill_at}:  # mid-evaluation of a round: its trials are asked, not told
        os.kill(os.getpid(), signal.SIGKILL)
    with open({done!r}, "a") as f:  # one line per completed evaluation
        f.writelines(repr(space.canonical(c)) + "\\n" for c in configs)
    return [{{"val_ce": toy_loss(c)}} for c in configs]

s = Search(space, lora_objectives_for(space), q=3, n_init=5, surrogate="gp", nuts=TINY_NUTS,
           acquisition=TINY_ACQ, seed=3, log_path={log!r})
s.run(score, {planned}, progress=False)
"""


def test_sigkilled_search_process_resumes_without_repeating_an_evaluation(tmp_path, lora_space, lora_objectives):
    """A real kill (SIGKILL of the search process during a round), then a restart."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    log, done, planned = tmp_path / "trials.jsonl", tmp_path / "done.txt", 11
    script = tmp_path / "search_job.py"
    script.write_text(KILLED_SCRIPT.format(
        helpers=str(Path(__file__).parent), kill_at=3, done=str(done), log=str(log), planned=planned))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = done.read_text().splitlines()
    assert len(first) == 6  # two rounds of 3 told; the third round died while being scored

    f2, st2 = counting(lora_round)
    s2 = make(lora_space, lora_objectives, q=3, n_init=5, log_path=log, seed=3)
    assert s2.n_finished == 6 and not s2.pending
    s2.run(f2, planned, progress=False)
    assert s2.n_finished == planned and len(first) + len(st2["configs"]) == planned
    again = [repr(lora_space.canonical(c)) for c in st2["configs"]]
    assert not set(again) & set(first), "a finished trial was evaluated again"
    recs = [r for r in read_lines(log) if r["type"] == "trial"]
    assert sorted(r["trial_id"] for r in recs) == list(range(planned))
    assert len({repr(lora_space.canonical(LoRAConfig.from_dict(r["config"]))) for r in recs}) == planned


def test_corrupt_and_truncated_lines_are_skipped_never_losing_good_ones(tmp_path, lora_space, lora_objectives):
    log = tmp_path / "trials.jsonl"
    make(lora_space, lora_objectives, q=2, n_init=6, log_path=log).run(lora_round, 4, progress=False)
    lines = log.read_text().splitlines(keepends=True)
    good = [json.loads(x) for x in lines[1:]]
    bad_record = dict(good[0], trial_id=99, x=[0.0])  # valid JSON, wrong x length
    mismatched = dict(good[0], trial_id=98, config={"layer_mask": [True] * 8, "modules": [1] * 8, "ranks": [8] * 8})
    text = (
        lines[0] + lines[1] + "this is not json\n" + lines[2] + json.dumps(bad_record) + "\n"
        + "\xff\xfe garbage\n" + json.dumps(mismatched) + "\n" + "[1, 2, 3]\n" + lines[3] + lines[4]
        + lines[1]  # a duplicated record
        + lines[4][: len(lines[4]) // 2]  # truncated last line, no newline
    )
    log.write_text(text)
    with pytest.warns(UserWarning) as rec:
        s = make(lora_space, lora_objectives, q=2, n_init=6, log_path=log)
    msgs = " | ".join(str(w.message) for w in rec)
    for lineno in (3, 5, 6, 7, 8, 11, 12):
        assert f"trials.jsonl:{lineno}:" in msgs
    assert s.n_finished == 4 and [t.trial_id for t in s.trials] == [0, 1, 2, 3]
    assert log.read_text().endswith("\n")  # the truncated tail was terminated
    s.run(lora_round, 6, progress=False)  # the next records land on lines of their own
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        s2 = make(lora_space, lora_objectives, q=2, n_init=6, log_path=log)
    assert s2.n_finished == 6 and [t.trial_id for t in s2.trials] == list(range(6))
    assert len(again) == len(rec)  # the same bad lines, nothing new


def test_log_of_another_search_is_refused(tmp_path, lora_space, lora_objectives):
    log = tmp_path / "trials.jsonl"
    make(lora_space, lora_objectives, q=2, n_init=4, log_path=log).run(lora_round, 2, progress=False)
    with pytest.raises(ValueError, match="log_path .* different search"):
        make(paper_space(4), [Objective("val_ce"), Objective("x")], log_path=log)
    with pytest.raises(ValueError, match="log_path .* directory"):
        make(lora_space, lora_objectives, log_path=tmp_path)
    # another seed's Sobol design: its logged design indices name other points
    with pytest.raises(ValueError, match="log_path .* seed=0; resume it with that seed .*seed=3"):
        make(lora_space, lora_objectives, q=2, n_init=4, log_path=log, seed=3)
    # q, n_init and the surrogate may change between runs of one log
    s = make(lora_space, lora_objectives, q=3, n_init=5, log_path=log, surrogate="saas")
    assert s.n_finished == 2


def test_run_logs_each_round_in_one_write_so_a_stop_inside_it_loses_the_round(tmp_path, lora_space,
                                                                             lora_objectives, monkeypatch):
    """``run`` appends a round's records in one write: a process stopped while telling a round
    leaves none of it, and the resumed search asks that round again, the same trials as a search
    never stopped (told one at a time, the rest of a round was asked as a new round)."""
    straight = make(lora_space, lora_objectives, q=3, n_init=3, log_path=tmp_path / "a.jsonl")
    writes = []
    real = search.loop.append_record
    monkeypatch.setattr(search.loop, "append_record", lambda p, r: writes.append(r) or real(p, r))
    straight.run(lora_round, 6, progress=False)
    assert [len(w) if isinstance(w, list) else 1 for w in writes] == [3, 3]  # the header came before

    def stop_at_round_2(path, record):
        if isinstance(record, list) and record[0]["round"] == 1:
            raise KeyboardInterrupt
        return real(path, record)

    log = tmp_path / "b.jsonl"
    monkeypatch.setattr(search.loop, "append_record", stop_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        make(lora_space, lora_objectives, q=3, n_init=3, log_path=log).run(lora_round, 6, progress=False)
    monkeypatch.setattr(search.loop, "append_record", real)
    resumed = make(lora_space, lora_objectives, q=3, n_init=3, log_path=log)
    assert resumed.n_finished == 3  # round 0 whole, nothing of round 1
    resumed.run(lora_round, 6, progress=False)
    assert [(t.round, t.config, t.source) for t in resumed.trials] == \
        [(t.round, t.config, t.source) for t in straight.trials]


def test_log_lines_are_whole_and_files_left_clean(tmp_path, lora_space, lora_objectives):
    log = tmp_path / "sub" / "trials.jsonl"
    s = make(lora_space, lora_objectives, q=2, n_init=4, log_path=log).run(lora_round, 4, progress=False)
    raw = log.read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(x) for x in raw.splitlines())
    p1, p2 = s.plot(tmp_path / "plots")
    assert p1.read_bytes()[:4] == b"\x89PNG" and p2.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "plots")) == ["search_hypervolume.png", "search_pareto.png"]


# ------------------------------------------------------------------------- run()
def test_run_budget_and_modes(lora_space, lora_objectives):
    s = make(lora_space, lora_objectives, q=4, n_init=10)
    s.run(lambda c: {"val_ce": toy_loss(c)}, 5, batched=False, progress=False)
    assert s.n_finished == 5
    s.run(lora_round, 3, progress=False)  # already past the budget: nothing to do
    assert s.n_finished == 5
    s.run(lora_round, 7, progress=False)
    assert s.n_finished == 7 and not s.pending
    with pytest.raises(ValueError, match="returned 1 results for 3"):
        s.run(lambda cs: [{"val_ce": 1.0}], 10, progress=False)
    with pytest.raises(TypeError, match="sequence of results"):
        s.run(lambda cs: {"val_ce": 1.0}, 10, progress=False)
    with pytest.raises(TypeError, match="objective must be callable"):
        s.run(None, 10)
    with pytest.raises(ValueError, match="n_trials"):
        s.run(lora_round, -1)


def test_a_seed_torch_and_jax_cannot_take_is_refused(lora_space, lora_objectives):
    """A seed of 2**63 or more used to be taken: every Bayesian round then failed to seed torch
    and JAX and fell back to Sobol points with only a warning."""
    make(lora_space, lora_objectives, seed=2**62 - 1)
    for seed in (2**62, 2**63, 2**64):
        with pytest.raises(ValueError, match=r"seed must be < 2\*\*62"):
            make(lora_space, lora_objectives, seed=seed)


def test_module_level_run_and_select(lora_space, lora_objectives):
    s = run(lora_round, 8, lora_space, lora_objectives, q=4, n_init=8, progress=False, surrogate="gp")
    front = s.pareto_front()
    assert front and s.n_finished == 8
    best = s.select("val_ce")
    assert best.values["val_ce"] == min(t.values["val_ce"] for t in s.trials)
    cheap = s.select("val_ce", tolerance=10.0, then="parameters")
    assert cheap.values["parameters"] == min(t.values["parameters"] for t in front)
    with pytest.raises(ValueError, match="primary"):
        s.select("rouge")
    with pytest.raises(ValueError, match="tolerance"):
        s.select("val_ce", tolerance=-1)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(q=0), ValueError, "q must be >= 1"),
        (dict(q=2.5), TypeError, "q must be an int"),
        (dict(n_init=-1), ValueError, "n_init"),
        (dict(surrogate="rf"), ValueError, "surrogate"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(nuts=dict(warmup_steps=4)), TypeError, "nuts"),
        (dict(acquisition=3), TypeError, "acquisition"),
        (dict(ref_point=[1.0]), ValueError, "ref_point must have 2"),
        (dict(ref_point={"loss": 1.0}), ValueError, "ref_point has unknown"),
        (dict(ref_point=[1.0, math.nan]), ValueError, "ref_point"),
        (dict(ref_point="11"), TypeError, "ref_point"),
    ],
)
def test_search_bad_arguments(kwargs, exc, match, lora_space, lora_objectives):
    with pytest.raises(exc, match=match):
        Search(lora_space, lora_objectives, **kwargs)


def test_search_bad_space_and_objectives(lora_space, lora_objectives):
    with pytest.raises(TypeError, match="space"):
        Search([(0, 1)], lora_objectives)
    with pytest.raises(ValueError, match="at least 2"):
        Search(lora_space, [Objective("a")])
    with pytest.raises(ValueError, match="unique"):
        Search(lora_space, [Objective("a"), Objective("a", "maximize")])
    with pytest.raises(ValueError, match="at least one objective must be evaluated"):
        Search(lora_space, [lora_objectives[1], lora_space.parameter_count_objective("p2")])
    with pytest.raises(TypeError, match="objectives"):
        Search(lora_space, Objective("a"))
    with pytest.raises(TypeError, match=r"objectives\[1\]"):
        Search(lora_space, [Objective("a"), "b"])
    with pytest.raises(ValueError, match="direction"):
        Objective("a", "down")
    with pytest.raises(ValueError, match="name"):
        Objective("")


def test_tell_bad_input(lora_space, lora_objectives):
    s = make(lora_space, lora_objectives, q=2, n_init=4)
    t, u = s.ask()
    with pytest.raises(ValueError, match="missing objective"):
        s.tell(t, {"loss": 1.0})
    with pytest.raises(ValueError, match="must have 1 entries"):
        s.tell(t, [1.0, 2.0])
    with pytest.raises(TypeError, match=r"values\['val_ce'\]"):
        s.tell(t, {"val_ce": "1.0"})
    with pytest.raises(TypeError, match=r"values\['val_ce'\]"):
        s.tell(t, {"val_ce": True})
    with pytest.raises(TypeError, match="values must be"):
        s.tell(t, 1.0)
    with pytest.raises(ValueError, match="trial 7 is unknown"):
        s.tell(7, [1.0])
    with pytest.raises(TypeError, match="trial"):
        s.tell("0", [1.0])
    s.tell(t, [1.0])
    with pytest.raises(ValueError, match="already told"):
        s.tell(t, [1.0])
    with pytest.raises(ValueError, match="n must be >= 1"):
        s.ask(0)
    with pytest.raises(ValueError, match="reference point"):
        make(lora_space, lora_objectives).reference_point()


def test_settings_bad_input():
    with pytest.raises(ValueError, match="thinning"):
        NUTSSettings(16, 8, 16)
    with pytest.raises(ValueError, match="warmup_steps"):
        NUTSSettings(0, 8, 1)
    with pytest.raises(TypeError, match="num_samples"):
        NUTSSettings(16, 8.0, 1)
    with pytest.raises(ValueError, match="mc_samples"):
        AcquisitionSettings(mc_samples=0)
    X = torch.rand(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="Y must be finite"):
        search.surrogate.fit_surrogate(X, torch.tensor([[1.0], [math.nan], [0.0], [1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        search.surrogate.fit_surrogate(X, X[:, :1], kind="saasbo")
    with pytest.raises(ValueError, match="unit cube"):
        search.surrogate.fit_surrogate(X + 2, X[:, :1], kind="gp")
