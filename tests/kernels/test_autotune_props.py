"""Properties of the autotuner's CPU-side logic (``kernels/autotune.py``) and of the launch
records of ``kernels/aot.py``: what a short GPU session runs must not fail there for a reason a
CPU can see.

* the CLI refuses a bad argument before any tuning, naming it;
* :func:`kernels.autotune.tune`, its timing stubbed, keeps the fastest correct candidate of every
  bucket it reached, whenever it is cut short (SIGINT), and what it writes is read back by the
  strict reader and *found by the launchers' own lookups*;
* :func:`kernels.autotune.write_table` merges bucket by bucket (nothing lost, nothing doubled),
  in a deterministic order, and refuses a damaged file before replacing it;
* the candidates of every op and bucket are distinct launches the launchers accept;
* launch records round-trip through their JSON-lines file; damaged lines are named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources

from kernels import aot, autotune, lora_linear, tuning, use_backend
from kernels.tuning import DISPATCH_KNOBS, OPS, LaunchConfig, _load_table, get_config

CPU = torch.device("cpu")
_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def config_table(path: Path):
    """``path`` as the ``MILP_KERNEL_CONFIGS`` table inside the block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MILP_KERNEL_CONFIGS", str(path))
        _load_table.cache_clear()
        try:
            yield
        finally:
            _load_table.cache_clear()


def launcher_lookup(op: str, problem: autotune.Problem, dtype: torch.dtype) -> LaunchConfig:
    """The config the op's launcher asks for at ``problem`` (kernels/ops/*: the shrink passes
    ``n`` = the bank's rank, the expand ``k`` = the bank's rank)."""
    n = problem.max_rank if op == "shrink" else problem.n
    k = problem.max_rank if op == "expand" else problem.k
    return get_config(op, num_tokens=problem.num_tokens, n=n, k=k, max_rank=problem.max_rank, dtype=dtype,
                      device=CPU)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv, expected", [
    (["--tiny", "--ops", "", "--out", "{tmp}/t.json"], "--ops must name some of"),
    (["--tiny", "--ops", ",", "--out", "{tmp}/t.json"], "--ops must name some of"),
    (["--tiny", "--ops", "shrink,gemm", "--out", "{tmp}/t.json"], "--ops must name some of"),
    (["--tiny", "--jobs", "0", "--out", "{tmp}/t.json"], "--jobs must be >= 1, got 0"),
    (["--tiny"], "--tiny needs --out"),
    (["--tiny", "--out", "{tmp}"], "is a folder"),
    (["--tiny", "--out", "{tmp}/bad.json"], "must be valid JSON"),
    (["--tiny", "--out", "{tmp}/strict.json"], "unknown key(s) ['opps']"),
    (["--tiny", "--out", "{tmp}/entry.json"], "block_k must be a power of two"),
])
def test_cli_refuses_bad_arguments_before_tuning(argv, expected, tmp_path, monkeypatch, capsys):
    """Each is refused with exit 2 and a message naming the argument, before a GPU would have
    spent minutes tuning (a damaged or strict-refused ``--out`` used to fail at the write, after
    the run, losing it; ``--tiny`` wrote toy-size dispatch knobs into the GPU's own table)."""
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "strict.json").write_text(json.dumps({"opps": {}}))
    (tmp_path / "entry.json").write_text(json.dumps({"ops": {"shrink": [{"block_k": 8}]}}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(autotune, "tune", lambda *a, **k: pytest.fail("tuned despite a bad argument"))
    with pytest.raises(SystemExit) as exc:
        autotune.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_cli_without_a_gpu_needs_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(autotune, "tune", lambda *a, **k: pytest.fail("tuned without a GPU"))
    with pytest.raises(SystemExit):
        autotune.main(["--quick", "--out", str(tmp_path / "t.json")])
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_tunes_each_named_op_once(tmp_path, monkeypatch):
    """``--ops " shrink, shrink,expand"``: spaces are trimmed and an op named twice is tuned once
    (it used to be refused as unknown, or tuned twice into duplicate entries)."""
    seen = {}
    entry = {"max_tokens": 8, "n": None, "k": 48, "max_rank": 16, "dtype": "float32", "block_m": 16}

    def fake_tune(dtype, **kw):
        seen.update(kw)
        return {"device": "cpu (interpreter)", "ops": {"shrink": [entry], "expand": []}, "dispatch": {}}

    monkeypatch.setattr(autotune, "tune", fake_tune)
    out = tmp_path / "t.json"
    assert autotune.main(["--tiny", "--ops", " shrink, shrink,expand", "--out", str(out)]) == 0
    assert seen["ops"] == ("shrink", "expand")
    assert json.loads(out.read_text())["ops"] == {"shrink": [entry], "expand": []}


# ------------------------------------------------------------------------- tune, timing stubbed
class _Run:
    """The ``run`` closure of a stubbed bucket: what ``_time`` needs to know which it times."""

    def __init__(self, op, problem):
        self.op, self.problem = op, problem

    def __call__(self):
        return None


def _verdict(seed: int, op: str, problem: autotune.Problem, cfg: LaunchConfig) -> float | str:
    """A stubbed candidate's fate: ``"wrong"`` (fails the check), ``"oor"`` (out of resources),
    ``"error"`` (another compile or launch error) or its time in ms (few values: ties happen)."""
    r = random.Random(f"{seed}|{op}|{problem}|{cfg}")
    u = r.random()
    return "wrong" if u < 0.1 else "oor" if u < 0.15 else "error" if u < 0.2 else float(r.randint(1, 12))


def _forced(op: str) -> LaunchConfig:
    return tuning._override.table[op]  # the candidate tune() forces with use_config


@contextlib.contextmanager
def stubbed_tuner(seed: int, interrupt_at: int | None):
    """``tune`` with cheap buckets: no inputs built, no kernel run. Every step it takes (a bucket,
    the split schedules' timing, the dispatch timing) is recorded, and the one numbered
    ``interrupt_at`` raises ``KeyboardInterrupt`` (the SIGINT of ``timeout -s INT``)."""
    events, at_schedules = [], {}

    def step(what):
        events.append(what)
        if len(events) - 1 == interrupt_at:
            raise KeyboardInterrupt

    def runner(op, problem, dtype, device):
        step(("bucket", op, problem))
        return _Run(op, problem), lambda: 0.0 if _verdict(seed, op, problem, _forced(op)) != "wrong" else float("nan")

    def time_(run, device, quick=False):
        v = _verdict(seed, run.op, run.problem, _forced(run.op))
        if v == "oor":
            raise OutOfResources(300000, 232448, "shared memory")
        if v == "error":  # any other compile or launch failure of one variant
            raise RuntimeError("PassManager::run failed")
        return v

    def schedules(tuned, into, dtype, device, tiny):
        step(("schedules",))
        at_schedules.update({op: len(tuned[op]) for op in ("shrink", "expand")})
        into.update({"split_overlap_min_tokens": 96, "_measured_overlap": []})
        into.update({"split_parallel_max_tokens": 8, "_measured_parallel": []})

    def dispatch(dtype, device, tiny):
        step(("dispatch",))
        return {"fused_max_rank": 16, "_measured": {"fused_ms": 1.0, "fused_t_ms": 2.0}}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune, "_runner", runner)
        mp.setattr(autotune, "_time", time_)
        mp.setattr(autotune, "_time_split_schedules", schedules)
        mp.setattr(autotune, "_tune_dispatch", dispatch)
        yield events, at_schedules


def run_tune(**kw) -> dict:
    """``tune`` on the CPU; a SIGINT escaping it fails the test (it would lose the run)."""
    try:
        return autotune.tune(torch.bfloat16, device=CPU, progress=False, **kw)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped tune(): a run cut short there loses every bucket")


def expected_steps(ops: tuple[str, ...], grid: str) -> list[tuple]:
    """The steps of a whole run, in order: the split path's buckets, then its schedules, the
    other buckets, the dispatch timing last."""
    quick, tiny = grid == "quick", grid == "tiny"
    order = ("shrink", "expand", "grad_weights", "fused_linear")
    work = [("bucket", op, p) for op in order if op in ops for p in autotune.problems(tiny, quick)
            if autotune.worth_tuning(op, p, quick)]
    steps = [w for w in work if w[1] in ("shrink", "expand")]
    if {"shrink", "expand"} <= set(ops):
        steps.append(("schedules",))
    steps += [w for w in work if w[1] not in ("shrink", "expand")]
    return steps + ([("dispatch",)] if "fused_linear" in ops else [])


def best_of(seed: int, op: str, problem: autotune.Problem, grid: str) -> tuple[float, LaunchConfig] | None:
    """The fastest correct candidate that ran (the first of equal times), as tune() must pick it."""
    best = None
    for cfg in autotune.candidates(op, problem, grid == "tiny"):
        v = _verdict(seed, op, problem, cfg)
        if isinstance(v, float) and (best is None or v < best[0]):
            best = (v, cfg)
    return best


@_SETTINGS
@example(ops=["expand", "shrink"], grid="tiny", seed=0, interrupt=4)  # SIGINT in the schedules, after the buckets
@example(ops=list(OPS), grid="tiny", seed=0, interrupt=9)  # SIGINT in the dispatch timing, the last step
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=6),
       grid=st.sampled_from(["quick", "tiny", "quick", "full"]), seed=st.integers(0, 10**6),
       interrupt=st.one_of(st.none(), st.integers(0, 40)))
def test_tune_keeps_the_fastest_correct_config_of_every_bucket_it_reached(ops, grid, seed, interrupt, tmp_path_factory):
    """Whatever the ops (in any order, named twice) and wherever SIGINT cuts the run: every bucket
    reached has one entry, the fastest candidate that passed its check and launched; the split
    schedules are timed once the shrink and expand buckets are all tuned, the dispatch knob last;
    ``_interrupted`` says a run was cut short. The written table is taken by the strict reader,
    and each op's launcher, looking its config up as it does at run time, finds the tuned one
    (the shrink's and the expand's entries were keyed by the layer's n and k, which their
    launchers never ask for: tuned, written, and never used)."""
    unique = tuple(dict.fromkeys(ops))
    steps = expected_steps(unique, grid)
    cut = interrupt if interrupt is not None and interrupt < len(steps) else len(steps)
    with stubbed_tuner(seed, interrupt) as (events, at_schedules):
        table = run_tune(ops=tuple(ops), quick=grid == "quick", tiny=grid == "tiny")
    assert events == steps[: cut + 1 if cut < len(steps) else cut]
    assert list(table["ops"]) == list(unique)
    assert ("_interrupted" in table) == (cut < len(steps))
    reached = [s for s in steps[:cut] if s[0] == "bucket"]
    for op in unique:
        want = []
        for _, o, p in reached:
            best = best_of(seed, o, p, grid) if o == op else None
            if best is not None:
                want.append((p, best))
        got = table["ops"][op]
        assert len(got) == len(want)
        assert len({autotune._bucket(e) for e in got}) == len(got)  # one entry a bucket
        assert [autotune._bucket_order(e) for e in got] == sorted(autotune._bucket_order(e) for e in got)
        by_bucket = {(e["max_tokens"], e["max_rank"], e["n"], e["k"]): e for e in got}
        for p, (ms, cfg) in want:
            n, k = (None if op == "shrink" else p.n), (None if op == "expand" else p.k)
            e = by_bucket[(p.num_tokens, p.max_rank, n, k)]
            assert e["dtype"] == "bfloat16" and e["median_ms"] == ms
            assert LaunchConfig(**{f: e[f] for f in tuning._FIELDS}) == cfg
    # the schedules ran with every shrink and expand bucket tuned; the knobs kept if reached
    if ("schedules",) in steps[:cut]:
        assert at_schedules == {op: len(table["ops"][op]) for op in ("shrink", "expand")}
    assert ("split_overlap_min_tokens" in table["dispatch"]) == (("schedules",) in steps[:cut])
    assert ("fused_max_rank" in table["dispatch"]) == (("dispatch",) in steps[:cut])
    # round trip: written, read by the strict reader, found by the launchers' lookups
    path = tmp_path_factory.mktemp("tune") / "gpu.json"
    autotune.write_table(table, path)
    assert _load_table.__wrapped__(str(path))["__dispatch__"] == table["dispatch"]
    with config_table(path):
        for _, op, p in reached:
            best = best_of(seed, op, p, grid)
            if best is not None:
                assert launcher_lookup(op, p, torch.bfloat16) == best[1], (op, p)


def test_a_run_cut_short_while_timing_the_dispatch_keeps_every_bucket(monkeypatch):
    """SIGINT in the last step (the fused-vs-fused_t timing, which compiles a kernel variant no
    candidate had) used to escape tune(): the whole run was lost, nothing written."""
    with stubbed_tuner(seed=1, interrupt_at=None):
        full = run_tune(tiny=True)
    steps = expected_steps(OPS, "tiny")
    with stubbed_tuner(seed=1, interrupt_at=len(steps) - 1):
        cut = run_tune(tiny=True)
    assert cut["ops"] == full["ops"] and all(cut["ops"][op] for op in ("shrink", "expand", "fused_linear"))
    assert "fused_max_rank" not in cut["dispatch"] and cut["dispatch"]["split_overlap_min_tokens"] == 96
    assert "_interrupted" in cut and "_interrupted" not in full


def test_a_failing_candidate_is_skipped_and_a_broken_device_ends_the_run(monkeypatch, capsys):
    """Was: only OutOfResources was skipped; any other compile or launch error of one candidate
    ended tune() with a traceback and lost every bucket. Now the candidate is skipped and named
    (``_failed``); when the failure broke the device, the run ends keeping what it tuned."""
    with stubbed_tuner(seed=3, interrupt_at=None):
        table = run_tune(tiny=True)
    errors = [(op, p, cfg) for op in OPS for p in autotune.problems(True, False) if autotune.worth_tuning(op, p)
              for cfg in autotune.candidates(op, p, True) if _verdict(3, op, p, cfg) == "error"]
    assert errors and len(table["_failed"]) == len(errors) and "_interrupted" not in table
    assert all("RuntimeError: PassManager::run failed" in f for f in table["_failed"])
    assert capsys.readouterr().out.count("autotune: skipped") == min(len(errors), autotune._FAILURES_SHOWN)
    monkeypatch.setattr(autotune, "_device_alive", lambda device: False)
    with stubbed_tuner(seed=3, interrupt_at=None):
        cut = run_tune(tiny=True)
    assert len(cut["_failed"]) == 1 and "_interrupted" in cut
    assert "the device failed" in capsys.readouterr().out
    for op in OPS:  # the buckets before the failing one are kept as tuned
        assert cut["ops"][op] == table["ops"][op][: len(cut["ops"][op])]
    assert sum(map(len, cut["ops"].values())) < sum(map(len, table["ops"].values()))


def test_tune_refuses_an_unknown_op_before_tuning():
    with stubbed_tuner(seed=0, interrupt_at=None) as (events, _):
        with pytest.raises(ValueError, match=r"ops: unknown \['gemm'\]"):
            autotune.tune(torch.bfloat16, device=CPU, ops=("shrink", "gemm"), tiny=True, progress=False)
    assert events == []


@pytest.mark.parametrize("fused_ms, fused_t_ms, knob", [(1.0, 2.0, 16), (2.0, 1.0, 0), (1.0, 1.0, 0)])
def test_tune_dispatch_result_is_a_knob_the_reader_takes(fused_ms, fused_t_ms, knob, tmp_path, monkeypatch):
    """``fused_max_rank``: 16 only when the one-launch fused path is faster; the timings go under
    ``_measured``, which the strict reader takes as a note."""
    times = iter([fused_ms, fused_t_ms])
    monkeypatch.setattr(autotune, "_time", lambda fn, device, quick=False: next(times))
    got = autotune._tune_dispatch(torch.float32, CPU, tiny=True)
    assert got == {"fused_max_rank": knob, "_measured": {"fused_ms": fused_ms, "fused_t_ms": fused_t_ms,
                                                        "problem": dataclasses.asdict(autotune.Problem(96, 48, 40, 16,
                                                                                                       4))}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"ops": {}, "dispatch": got}))
    assert _load_table.__wrapped__(str(path))["__dispatch__"]["fused_max_rank"] == knob


# ------------------------------------------------------------- the launchers use the tuned entries
def test_tuned_entries_are_the_configs_the_launches_use(tmp_path):
    """Entries as the tuner writes them (:func:`kernels.autotune._bucket_entry`) are the configs
    of the real launches at that bucket, for each op: the shrink and the expand look theirs up
    by (k, rank) and (n, rank), so entries keyed by the layer's n and k were never found (the
    heuristic ran instead, silently)."""
    p = autotune.Problem(8, 48, 40, 16, 8)
    tuned = {"shrink": LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=2),
             "expand": LaunchConfig(block_m=16, block_n=16, block_r=16, n_blocks=2),
             "fused_linear": LaunchConfig(block_m=16, block_n=32, block_k=16, block_r=16),
             "grad_weights": LaunchConfig(block_r=16, block_n=32, block_k=16)}
    for op, cfg in tuned.items():  # none is the heuristic: a miss would show
        assert cfg != tuning.heuristic_config(op, num_tokens=8, n=40, k=48, max_rank=16, dtype=torch.float32)
    path = tmp_path / "gpu.json"
    autotune.write_table({"ops": {op: [autotune._bucket_entry(op, p, cfg, torch.float32, 0.1)]
                                  for op, cfg in tuned.items()}}, path)
    bank, plan, _, x, w = autotune._build(p, torch.float32, CPU)
    with config_table(path), use_backend("triton"), aot.LaunchRecorder() as rec:
        with torch.no_grad():
            lora_linear(x, w, None, bank, plan, path="split")
            lora_linear(x, w, None, bank, plan, path="fused")
        lora_linear(x.clone().requires_grad_(True), w, None, bank, plan, path="split").sum().backward()
    shown = {"lora_shrink": ("BLOCK_K", "SPLIT_K"), "lora_expand": ("BLOCK_N", "N_BLOCKS"),
             "fused_lora_linear": ("BLOCK_N", "BLOCK_K"), "lora_grad_weights": ("BLOCK_C", "BLOCK_T")}
    seen = {}
    for r in rec.records.values():
        seen.setdefault(r["kernel"], set()).add(tuple(r["constexprs"][c] for c in shown[r["kernel"]]))
    # the forward's shrink and expand (the backward's run on dy: other k and n, not this bucket)
    assert (16, 2) in seen["lora_shrink"] and (16, 2) in seen["lora_expand"]
    assert seen["fused_lora_linear"] == {(32, 16)} and seen["lora_grad_weights"] == {(32, 16)}


# ------------------------------------------------------------------------------- write_table
_ENTRY_KEYS = {"max_tokens": [None, 8, 96], "n": [None, 40], "k": [None, 48, 64], "max_rank": [None, 16],
               "dtype": [None, "float32", "bfloat16"]}


@st.composite
def entries(draw):
    e = {}
    for key, values in _ENTRY_KEYS.items():
        v = draw(st.sampled_from(values))
        if v is not None or draw(st.booleans()):  # null, or absent: both mean any
            e[key] = v
    e["block_m"] = draw(st.sampled_from([16, 32]))
    e["split_k"] = draw(st.integers(1, 3))
    return e


def _key(e):
    return autotune._bucket(e)


op_tables = st.dictionaries(st.sampled_from(OPS), st.lists(entries(), max_size=5), max_size=4)
tuned_tables = st.dictionaries(st.sampled_from(OPS), st.lists(entries(), max_size=5, unique_by=_key), max_size=4)
knobs = st.dictionaries(st.sampled_from(DISPATCH_KNOBS), st.integers(0, 4096), max_size=3)


@_SETTINGS
@given(old_ops=op_tables, old_knobs=knobs, new_ops=tuned_tables, new_knobs=knobs, old_cut=st.booleans(),
       new_cut=st.booleans())
def test_write_table_merges_bucket_by_bucket(old_ops, old_knobs, new_ops, new_knobs, old_cut, new_cut,
                                             tmp_path_factory):
    """Into any table the strict reader takes (null or absent match keys included): a tuned
    bucket replaces the old entries of its op and bucket, every other old entry stays (other ops,
    dtypes, sizes: an ``--ops`` subset or a run cut short used to drop every old entry of the
    tuned dtype); each op's entries sorted so the first match is the tuned entry at its bucket
    (nulls used to crash the sort, after the run); the ops in the file's order, new ones after
    (it was a set's order: another diff each run); dispatch knobs merged key by key; the notes of
    the old run (``_interrupted``) replaced by the new run's. The file is read back by the
    strict reader, and writing the same table again changes no byte."""
    path = tmp_path_factory.mktemp("merge") / "gpu.json"
    old = {"device": "old", "_note": "kept", "ops": old_ops, "dispatch": old_knobs,
           **({"_interrupted": "3 of 9 buckets tuned"} if old_cut else {})}
    path.write_text(json.dumps(old))
    assert _load_table.__wrapped__(str(path))  # a table the reader takes
    new = {"device": "new", "created": "now", "ops": new_ops, "dispatch": new_knobs,
           **({"_interrupted": "1 of 9 buckets tuned"} if new_cut else {})}
    autotune.write_table(new, path)
    text = path.read_text()
    got = json.loads(text)
    assert list(got["ops"]) == list(old_ops) + [op for op in new_ops if op not in old_ops]
    for op, merged in got["ops"].items():
        tuned = new_ops.get(op, [])
        keep = [e for e in old_ops.get(op, []) if _key(e) not in {_key(t) for t in tuned}]
        assert sorted(map(json.dumps, merged)) == sorted(map(json.dumps, keep + tuned))
        order = [autotune._bucket_order(e) for e in merged]
        assert order == sorted(order)
        for t in tuned:  # the first entry matching a tuned bucket is the tuned entry
            if all(t.get(key) is not None for key in _ENTRY_KEYS):
                q = dict(num_tokens=t["max_tokens"], n=t["n"], k=t["k"], max_rank=t["max_rank"],
                         dtype=getattr(torch, t["dtype"]))
                assert next(e for e in merged if tuning._match(e, **q)) == t
    assert got["dispatch"] == {**old_knobs, **new_knobs}
    assert got["device"] == "new" and got["created"] == "now" and got["_note"] == "kept"
    assert got.get("_interrupted") == new.get("_interrupted")
    assert _load_table.__wrapped__(str(path))["__dispatch__"] == got["dispatch"]
    autotune.write_table(new, path)
    assert path.read_text() == text


def test_write_table_merges_into_a_hand_written_table_with_nulls(tmp_path):
    """The table format's own example entry (``n``/``k`` null) made the merge raise after a run."""
    path = tmp_path / "gpu.json"
    generic = {"max_tokens": 64, "n": None, "k": None, "block_m": 16, "block_n": 64, "block_k": 128}
    path.write_text(json.dumps({"ops": {"fused_linear": [generic]}}))
    p = autotune.Problem(32, 4096, 11008, 96, 32)
    entry = autotune._bucket_entry("fused_linear", p, LaunchConfig(block_m=32, block_n=128), torch.bfloat16, 0.5)
    autotune.write_table({"ops": {"fused_linear": [entry]}}, path)
    assert json.loads(path.read_text())["ops"]["fused_linear"] == [entry, generic]  # specific first
    with config_table(path):
        assert launcher_lookup("fused_linear", p, torch.bfloat16).block_n == 128
        other = autotune.Problem(32, 4096, 4096, 96, 32)
        assert launcher_lookup("fused_linear", other, torch.bfloat16).block_k == 128  # the generic one


@pytest.mark.parametrize("damage, expected", [
    ("{not json", "must be valid JSON"),
    ("[]", "must be a JSON object"),
    (json.dumps({"ops": {"shrink": [{"block_k": 8}]}}), "block_k must be a power of two"),
    (json.dumps({"dispatch": {"fused_max_rnak": 1}}), "unknown knob"),
])
def test_write_table_refuses_a_damaged_table_and_leaves_it(damage, expected, tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(damage)
    entry = {"max_tokens": 8, "n": None, "k": 48, "max_rank": 16, "dtype": "float32", "block_m": 16}
    with pytest.raises(ValueError, match=f"cannot merge into {path}.*{expected}"):
        autotune.write_table({"ops": {"shrink": [entry]}}, path)
    assert path.read_text() == damage and [p.name for p in tmp_path.iterdir()] == ["gpu.json"]


# ------------------------------------------------------------------------------- candidates
def _launch_of(op: str, p: autotune.Problem, cfg: LaunchConfig, plan) -> tuple:
    """What the op's launcher would launch for ``cfg`` at ``p`` (its host plan: grid, constexprs,
    options), computed on the host only."""
    from kernels.ops.expand import _expand_plan
    from kernels.ops.fused_linear import _fused_plan
    from kernels.ops.grad_weights import _grad_weights_plan
    from kernels.ops.shrink import _shrink_plan

    st_, tiles, segs, bms = plan
    dims = (tuple(bms), st_.numel(), segs.shape[0], tiles.shape[0])
    dt, decode = torch.bfloat16, autotune.decode_like(p)
    with tuning.use_config(op, cfg):
        if op == "shrink":
            *head, launch = _shrink_plan(p.num_tokens, p.k, p.max_rank, *dims, decode, dt, CPU)
        elif op == "expand":
            *head, launch = _expand_plan(p.num_tokens, p.n, p.max_rank, *dims, 4 if decode else 1, True, dt, CPU)
        elif op == "fused_linear":
            *head, launch = _fused_plan(p.num_tokens, p.n, p.k, p.max_rank, *dims, False, False, True, dt, CPU)
        else:
            head, launch = [], _grad_weights_plan(p.num_tokens, p.n, p.k, p.max_rank, segs.shape[0], dt, CPU)
    return tuple(head), launch.grid, tuple(sorted(launch.kw.items()))


def test_candidates_are_distinct_launches_the_launchers_take():
    """Every candidate of every op and bucket (full, quick and tiny grids) is planned by its
    launcher without an error, and no two launch alike: a duplicate is timed for nothing in a
    15-minute session (the decode expand's GEMV form tried 64- and 256-wide column blocks the
    launcher caps alike at rank 96, and split_n values past the column blocks: 8 of 52)."""
    from kernels.plan import BatchPlan

    plans = {}
    problems = {*autotune.problems(), *autotune.problems(quick=True)}
    for p in sorted(problems, key=dataclasses.astuple):
        if (p.num_tokens, p.users) not in plans:
            plans[p.num_tokens, p.users] = BatchPlan.build(torch.arange(p.num_tokens) % p.users, p.users).as_args()
        for op in OPS:
            cands = autotune.candidates(op, p)
            assert cands and len(set(cands)) == len(cands), (op, p)
            launches = [_launch_of(op, p, c, plans[p.num_tokens, p.users]) for c in cands]
            assert len(set(launches)) == len(launches), (op, p)
    with pytest.raises(ValueError, match="op must be one of"):
        autotune.candidates("gemm", autotune.problems(tiny=True)[0])


# --------------------------------------------------------------------------- launch records
def _record_every_kernel() -> aot.LaunchRecorder:
    """Records of real launches of every kernel (the expand's GEMV form too), under the interpreter."""
    p = autotune.Problem(8, 48, 40, 16, 8)
    bank, plan, _, x, w = autotune._build(p, torch.float32, CPU)
    with use_backend("triton"), aot.LaunchRecorder() as rec:
        with torch.no_grad():
            lora_linear(x, w, None, bank, plan, path="fused")
            with tuning.use_config("expand", LaunchConfig(block_m=16, block_n=64, split_n=2)):
                lora_linear(x, w, None, bank, plan, path="split")
        lora_linear(x.clone().requires_grad_(True), w, None, bank, plan, path="split").sum().backward()
    return rec


def test_launch_records_round_trip_through_their_file(tmp_path):
    rec = _record_every_kernel()
    assert {r["kernel"] for r in rec.records.values()} == set(aot._KERNELS)
    path = tmp_path / "launches.jsonl"
    assert rec.write(str(path)) == len(rec.records)
    rec.write(str(path))  # appended twice (two sessions): read back once, in the order written
    assert aot.read_records(str(path)) == list(rec.records.values())
    assert all(aot._record_problem(r) is None for r in rec.records.values())


def test_read_records_of_empty_and_blank_files(tmp_path):
    path = tmp_path / "launches.jsonl"
    path.write_text("")
    assert aot.read_records(str(path)) == []
    path.write_text("\n  \n")
    assert aot.read_records(str(path)) == []


_GOOD = {"kernel": "lora_shrink", "signature": {"x_ptr": "*bf16"}, "constexprs": {"ACC": {"tl_dtype": "fp32"}},
         "div16": ["x_ptr"], "options": {"num_warps": 4}}


@pytest.mark.parametrize("line, expected", [
    (json.dumps(_GOOD)[:40], "not a JSON record"),  # the partial last line of a write cut short
    ("[]", "a record must be a JSON object, got list"),
    ("{}", "kernel must be one of"),
    (json.dumps(dict(_GOOD, kernel="lora_gemm")), "kernel must be one of .* got 'lora_gemm'"),
    (json.dumps({k: v for k, v in _GOOD.items() if k != "options"}), "options must be a JSON object"),
    (json.dumps(dict(_GOOD, div16="x_ptr")), "div16 must be a JSON array"),
    (json.dumps(dict(_GOOD, constexprs={"ACC": {"tl_dtype": "fp8"}})), r"constexprs \['ACC'\]"),
])
def test_read_records_names_a_damaged_line(line, expected, tmp_path, capsys):
    """A line that is not a launch record is named (file and line) when the file is read, and
    the CLI refuses it with exit 2 (a valid-JSON non-record used to pass the reader and stop
    ``compile_recorded`` or ``main`` with a KeyError or TypeError, possibly in a worker)."""
    path = tmp_path / "launches.jsonl"
    path.write_text(json.dumps(_GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"launches.jsonl:2: .*{expected}"):
        aot.read_records(str(path))
    with pytest.raises(SystemExit) as exc:
        aot.main(["--recorded", str(path)])
    assert exc.value.code == 2 and "launches.jsonl:2:" in capsys.readouterr().err


def test_compile_recorded_reports_a_bad_record_and_goes_on(monkeypatch):
    """Each record gets its own ``(record, None, error)``; one of an unknown kernel used to raise
    out of the whole compile (every variant after it lost)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the records below fail before any compile
    stale = dict(_GOOD)  # lacks most of the shrink kernel's parameters
    unknown = dict(_GOOD, kernel="lora_gemm")
    out = aot.compile_recorded([unknown, stale], arch=90)
    assert [r for r, _, _ in out] == [unknown, stale] and all(report is None for _, report, _ in out)
    assert "kernel must be one of" in out[0][2] and "lacks parameters" in out[1][2]
