"""Scenario tests of ``torchrun -m milp.train`` (2 gloo processes on CPU) against one process:
the same results (to rounding: a user's adapters depend in the last bits on the users it shares
its batches with, and the processes' gradients add up in another order), a run stopped or
killed in one world size resumed in another, a search shared by the processes, output printed once.

The torchrun runs start this file as their script (the ``__main__`` block): ``milp.train``,
stopped at a write as ``$MILP_TEST_STOP`` says (tests/milp/test_train.py stops its in-process
runs the same way, at an ``os.replace``)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config  # tests/milp is on sys.path (pytest's rootdir-relative import)
from run_outputs import run_outputs

import milp.train as train

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")

#: 7 users (5 train, 1 val, 1 test: fewer val and test users than processes; 7 and the batch of 3
#: split unevenly), 2 slots (memory injection in groups, instruction batches through the store);
#: enough instruction steps for a change of the batches to show beyond rounding
ARGS = ["--users", "7", "--memory-steps", "2", "--instruct-steps", "4", "--batch-size", "3", "--max-new-tokens", "3",
        "--max-length", "96", "--slots", "2", "--no-progress"]
#: a small search: 3 Sobol configurations, no surrogate fit
SEARCH = ["--search", "3", "--search-q", "3", "--search-surrogate", "gp", "--search-modules", "0-3",
          "--search-ranks", "4,8", "--search-init", "3"]


def _stopping_replace(spec: str, real: Callable[..., None]) -> Callable[..., None]:
    """``os.replace`` (every atomic publish) that stops this process at the write ``spec`` names:
    ``"TARGET:HOW"``, TARGET a file's name or ``user folder N`` (the N-th user folder this process
    publishes); HOW ``interrupt`` (``KeyboardInterrupt``: the writer cleans up) or ``kill``
    (``os._exit``: its temp file or folder stays, as after a SIGKILL, or torchrun's SIGTERM of the
    other processes of a failed run)."""
    target, how = spec.rsplit(":", 1)
    folders = 0

    def replacing(src, dst):
        nonlocal folders
        name = Path(dst).name
        if Path(dst).parent.name == "users":
            folders += 1
        if name == target or (Path(dst).parent.name == "users" and target == f"user folder {folders}"):
            if how == "kill":
                os._exit(1)
            raise KeyboardInterrupt
        return real(src, dst)

    return replacing


def _torchrun(ckpt: Path, out: Path, *args: str, stop: str | None = None, fail: str | None = None,
              logs: Path | None = None, prog: str = "train") -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 milp.train`` (this file; ``prog="evaluate"``: milp.evaluate
    with test_evaluate.py's stand-in embedder); ``stop``: ``"RANK:TARGET:HOW"`` (see
    :func:`_stopping_replace`); ``fail``: ``"RANK:NAME"``, ``milp.train``'s function NAME raises
    ``RuntimeError("injected failure")`` in that process; ``logs``: each process's output in its
    own files there."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MILP_TEST_STOP=stop or "", MILP_TEST_FAIL=fail or "", MILP_TEST_PROG=prog)
    split = ["--log-dir", str(logs), "--redirects", "3"] if logs else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *split,
           __file__, "--model", str(ckpt), "--output", str(out), *args]
    # a process that failed must end the run (torchrun stops the others), never leave it waiting at a barrier
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _close(a: object, b: object) -> bool:
    """``a == b``, floats to rounding (relative 1e-5, absolute 1e-6)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5,
                                                                                           abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def _assert_same_results(got: Path, want: Path) -> None:
    """``got`` holds the files of ``want`` (a run never stopped), to rounding, and no debris: no
    temp files or folders, no per-process part files."""
    g, w = run_outputs(got), run_outputs(want)
    for m in (g, w):
        m["metrics.json"].pop("world_size")
    assert sorted(g) == sorted(w)
    assert [k for k in w if not _close(g[k], w[k])] == []
    assert not [p for p in got.rglob("*") if ".tmp" in p.name or ".old-" in p.name or ".rank" in p.name]


@pytest.fixture(scope="module")
def ckpt(tiny_chat_tokenizer, tmp_path_factory):
    """The tests' tiny checkpoint (tests/milp/conftest.py's ``tiny_checkpoint``), once per module."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("torchrun") / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer))).save_pretrained(path)
    tiny_chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """A single-process run of :data:`ARGS` never stopped."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(["--model", str(ckpt), "--output", str(out), *ARGS]) == 0
    return out


def test_two_processes_give_the_results_of_one_and_print_once(ckpt, reference, tmp_path):
    """Was: each process drew its own instruction batches (seed + 1000 * rank) and the gradients
    were averaged: 2 processes trained on batches of 2 x --batch-size other examples, so the
    instruction adapter, the predictions and the metrics depended on the world size (the adapter
    by ~1e-3 here), and instruction.json held rank 0's losses alone. Now the processes share
    each batch. Was too: every process drew its progress bars (memory injection, generation,
    transformers' "Loading weights", that one even with --no-progress)."""
    out = tmp_path / "two"
    proc = _torchrun(ckpt, out, *[a for a in ARGS if a != "--no-progress"], logs=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    _assert_same_results(out, reference)
    (r0_out,), (r0_err,) = (list((tmp_path / "logs").rglob(f"0/{s}.log")) for s in ("stdout", "stderr"))
    (r1_out,), (r1_err,) = (list((tmp_path / "logs").rglob(f"1/{s}.log")) for s in ("stdout", "stderr"))
    assert "memory injection:" in r0_err.read_text() and "milp.train:" in r0_out.read_text()
    assert "it/s" not in r1_err.read_text() and "milp.train:" not in r1_out.read_text()


@pytest.fixture(scope="module")
def search_reference(ckpt, tmp_path_factory):
    """A single-process run of :data:`ARGS` with :data:`SEARCH`, never stopped."""
    out = tmp_path_factory.mktemp("search-reference") / "run"
    assert train.main(["--model", str(ckpt), "--output", str(out), *ARGS, *SEARCH]) == 0
    return out


def test_two_processes_search_as_one(ckpt, search_reference, tmp_path):
    """Each process scores its share of a round's (configuration, validation user) pairs (here
    2 and 1 of the round's 3; the reference configuration's single pair leaves rank 1 nothing to
    do): the trial log, the pick and everything trained after it are one process's, to
    rounding. Was: ``--search`` was refused under torchrun (run it in one process, then resume)."""
    out = tmp_path / "two"
    proc = _torchrun(ckpt, out, *ARGS, *SEARCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    _assert_same_results(out, search_reference)
    picked = json.loads((out / "search" / "selected.json").read_text())["memory_config"]
    for d in (out / "users").iterdir():  # every process trained its users with the picked configuration
        assert json.loads((d / "memory_config.json").read_text()) == picked


def test_a_search_stopped_in_two_processes_resumes_in_one(ckpt, search_reference, tmp_path):
    """Rank 0 interrupted as it writes the pick (rank 1 waits for its next command and torchrun
    stops it): the trial log is complete, and one process resumes the run to the results of one
    never stopped, evaluating nothing again."""
    out = tmp_path / "run"
    proc = _torchrun(ckpt, out, *ARGS, *SEARCH, stop="0:selected.json:interrupt")
    assert proc.returncode != 0 and not (out / "search" / "selected.json").exists()
    assert len((out / "search" / "trials.jsonl").read_text().splitlines()) >= 3
    assert train.main(["--model", str(ckpt), "--output", str(out), *ARGS, *SEARCH]) == 0
    _assert_same_results(out, search_reference)


@pytest.mark.parametrize("rank, where, says", [
    ("1", "response_losses", ["process 1: RuntimeError: injected failure"] * 2),
    ("0", "response_losses", ["process 0: RuntimeError: injected failure"] * 2),
    ("0", "_pick", ["RuntimeError: injected failure", "the search failed in process 0 (RuntimeError: injected"]),
])
def test_a_search_failing_in_one_process_fails_every_process_by_name(ckpt, search_reference, tmp_path, rank, where,
                                                                     says):
    """A process whose share of a round fails (``response_losses`` raising in it), or rank 0
    failing outside the evaluation (in the pick): every process exits with an error that names
    the failing process, none waits at a collective for the others (the run's timeout would
    catch a hang), and the failing process prints its own traceback. Then (once: each resume
    takes a torchrun) two processes resume the run to the results of one never stopped."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _torchrun(ckpt, out, *ARGS, *SEARCH, fail=f"{rank}:{where}", logs=logs)
    assert proc.returncode != 0
    errs = [next(logs.rglob(f"{r}/stderr.log")).read_text() for r in ("0", "1")]
    for err, want in zip(errs, says):
        assert want in err, err[-2000:]
    assert "Traceback" in errs[int(rank)] and "injected failure" in errs[int(rank)]
    if (rank, where) != ("1", "response_losses"):
        return
    proc = _torchrun(ckpt, out, *ARGS, *SEARCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_results(out, search_reference)


@pytest.mark.parametrize("value, why", [("0", "an int >= 1"), ("soon", "an int"), ("", "an int")])
def test_a_bad_wait_for_the_other_processes_is_refused_by_name_before_any_group(monkeypatch, value, why):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MILP_DIST_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=re.escape(f"MILP_DIST_TIMEOUT_S (set by the user) must be {why}, got")):
        train.Dist.from_env(torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def _compare_in_one_and_two(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> list[str]:
    """``milp.evaluate`` with ``args`` (and test_evaluate's FAST settings and stand-in embedder)
    in one process and under torchrun in two: asserts the two reports are the same, to rounding
    (the command and --output aside: they name the folder); returns the two ranks' logs."""
    from run_outputs import untimed
    from test_evaluate import FAST, FakeEmbedder

    import milp.evaluate as ev
    import milp.models

    monkeypatch.setattr(milp.models, "load_default_embedder", lambda *a, **k: FakeEmbedder())
    one = tmp_path / "one"
    assert ev.main(["--model", str(ckpt), "--output", str(one), *args, *FAST]) == 0
    two = tmp_path / "two"
    proc = _torchrun(ckpt, two, *args, *FAST, prog="evaluate", logs=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = (untimed(json.loads((d / "comparison.json").read_text())) for d in (one, two))
    for r in (want, got):
        r.pop("command"), r["settings"].pop("output")
    assert _close(got, want)
    return [next((tmp_path / "logs").rglob(f"{r}/stdout.log")).read_text() for r in ("0", "1")]


def test_a_comparison_in_two_processes_runs_a_seed_each_and_reports_as_one(ckpt, tmp_path, monkeypatch):
    """``torchrun -m milp.evaluate``: with 2 seeds of 2 methods, each process runs one seed's (the
    units dealt method by method), and rank 0 writes the report once both are done: the report of
    one process. Was: refused."""
    logs = _compare_in_one_and_two(ckpt, tmp_path, monkeypatch, "--seeds", "0,1", "--methods", "tplp,milp")
    assert "[rank 0] seed 0: MiLP" in logs[0] and "[rank 1] seed 1: MiLP" in logs[1] and "seed 1: MiLP" not in logs[0]
    assert "# Personalization comparison" in logs[0] and "# Personalization comparison" not in logs[1]  # once


def test_one_seeds_methods_spread_over_two_processes_and_report_as_one(ckpt, tmp_path, monkeypatch):
    """One seed in 2 processes: MiLP with its memory-only ablation (one unit: it answers with
    MiLP's users) in rank 0, TpLP in rank 1, each writing its own methods' response CEs; the
    report is one process's. Was: whole seeds per process, so rank 1 idled."""
    import milp.evaluate as ev

    logs = _compare_in_one_and_two(ckpt, tmp_path, monkeypatch, "--seeds", "0", "--methods",
                                   "milp,milp-no-instruction,tplp")
    assert "[rank 0] seed 0: MiLP\n" in logs[0] and f"[rank 0] seed 0: {ev.LABELS['milp-no-instruction']}" in logs[0]
    assert f"[rank 1] seed 0: {ev.LABELS['tplp']}" in logs[1] and "seed 0: MiLP" not in logs[1]
    assert f"seed 0: {ev.LABELS['tplp']}" not in logs[0]
    assert "response CE of TpLP" in logs[1] and "response CE of TpLP" not in logs[0]


def test_a_killed_process_fails_the_run_and_one_process_resumes_it(ckpt, reference, tmp_path):
    """Rank 1 killed while publishing its 2nd user folder: the run fails (rank 0 does not wait
    at a barrier), and a single-process run resumes it to the results of a run never stopped.
    Was: the killed writer's temp folder stayed in users/ for good."""
    out = tmp_path / "run"
    proc = _torchrun(ckpt, out, *ARGS, stop="1:user folder 2:kill")
    assert proc.returncode != 0
    assert [p for p in (out / "users").iterdir() if ".tmp-" in p.name]  # the debris of the kill
    assert train.main(["--model", str(ckpt), "--output", str(out), *ARGS]) == 0
    _assert_same_results(out, reference)


def test_one_process_stopped_then_two_stopped_then_two_resume(ckpt, reference, tmp_path, monkeypatch):
    """A single-process run stopped mid-way through memory injection, resumed with 2 processes
    that are stopped when rank 0 publishes the instruction adapter (rank 0 interrupted, rank 1
    killed by torchrun at the barrier), resumed with 2 processes again: the results of a run
    never stopped."""
    out = tmp_path / "run"
    monkeypatch.setattr(os, "replace", _stopping_replace("user folder 3:interrupt", os.replace))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--model", str(ckpt), "--output", str(out), *ARGS])
    monkeypatch.undo()
    proc = _torchrun(ckpt, out, *ARGS, stop="0:instruction_adapter.safetensors:interrupt")
    assert proc.returncode != 0 and not (out / "instruction.json").exists()
    assert len(list((out / "users").iterdir())) == 7
    proc = _torchrun(ckpt, out, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_results(out, reference)


def test_merged_losses_are_in_user_order_whatever_the_world_size(tmp_path):
    """Was: memory_losses.json listed rank 0's users, then rank 1's, ...: another file, and
    another order of the sums behind metrics.json's mean losses, for each world size."""
    st = _losses_state(tmp_path)
    (tmp_path / "memory_losses.rank0.json").write_text(json.dumps({"u0": [1.0], "u2": [2.0]}))
    (tmp_path / "memory_losses.rank1.json").write_text(json.dumps({"u1": [3.0]}))
    train._merge_losses(st)
    assert list(json.loads((tmp_path / "memory_losses.json").read_text())) == ["u0", "u1", "u2"]
    assert [p.name for p in tmp_path.iterdir()] == ["memory_losses.json"]


def _losses_state(out):
    return train._State(args=train.build_parser().parse_args([]), out=out, dist=train.Dist(),
                        device=torch.device("cpu"))


def test_a_group_trained_again_in_another_world_size_overrides_the_stopped_ranks_losses(tmp_path):
    """Was: the part files were applied by name, so rank 1's losses of a group that a stopped
    2-process run recorded (and never saved) overrode the losses rank 0 recorded when the
    resumed 1-process run trained that group again. The latest line wins, whichever file; an
    older version's part file (one JSON object) counts as written at its file's time."""
    st = _losses_state(tmp_path)
    legacy = tmp_path / "memory_losses.rank2.json"
    legacy.write_text(json.dumps({"u3": [9.0], "u4": [4.0]}))
    os.utime(legacy, ns=(1_000, 1_000))
    (tmp_path / "memory_losses.rank1.jsonl").write_text(json.dumps({"t": 2_000, "losses": {"u1": [1.0]}}) + "\n")
    (tmp_path / "memory_losses.rank0.jsonl").write_text(
        json.dumps({"t": 500, "losses": {"u4": [5.0]}}) + "\n"
        + json.dumps({"t": 3_000, "losses": {"u1": [2.0], "u3": ["nan"]}}) + "\n")
    train._merge_losses(st)
    merged = json.loads((tmp_path / "memory_losses.json").read_text(), parse_constant=float)
    assert list(merged) == ["u1", "u3", "u4"]
    assert merged["u1"] == [2.0] and math.isnan(merged["u3"][0]) and merged["u4"] == [4.0]
    assert [p.name for p in tmp_path.iterdir()] == ["memory_losses.json"]


def test_recorded_losses_append_a_line_each_and_survive_a_torn_line(tmp_path):
    """Each group is one appended line (the part file was one object rewritten per group); a
    crash's torn last line is skipped, and the next group lands on a line of its own."""
    st = _losses_state(tmp_path)
    train._record_losses(st, {"a": [1.0, 0.5]})
    part = tmp_path / "memory_losses.rank0.jsonl"
    with open(part, "ab") as f:
        f.write(b'{"t": 5, "losses": {"b": [')
    train._record_losses(st, {"b": [2.0], "c": [float("inf")]})
    assert len(part.read_text().splitlines()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn line is skipped silently
        _, losses = train._loss_parts(tmp_path)
    assert losses == [{"a": [1.0, 0.5]}, {"b": [2.0], "c": [math.inf]}]


@pytest.mark.parametrize("line, why", [
    ('{"losses": {"a": [1.0]}}', 'expected an integer time "t", got None'),
    ('{"t": true, "losses": {"a": [1.0]}}', 'expected an integer time "t", got True'),
    ('{"t": 1, "losses": [1.0]}', "expected a JSON object of each user's losses, got a JSON list"),
    ('{"t": 1, "losses": {"a": ["x"]}}', "not a number: 'x'"),
    ('[{"t": 1, "losses": {"a": [1.0]}}]', "expected a JSON object, got a JSON list"),
])
def test_a_losses_line_of_another_shape_is_refused_by_file_and_line(tmp_path, line, why):
    part = tmp_path / "memory_losses.rank0.jsonl"
    part.write_text('{"t": 1, "losses": {"a": [1.0]}}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{part}:2 is damaged: {why}")):
        train._loss_parts(tmp_path)


def _threads_all_reduce(world: int) -> list[Callable[[list[torch.Tensor]], None]]:
    """One summing ``all_reduce`` per rank of ``world`` threads (the same order of the sum on each)."""
    import threading

    barrier, flats = threading.Barrier(world, timeout=30), [torch.empty(0)] * world

    def of(rank: int) -> Callable[[list[torch.Tensor]], None]:
        def reduce(tensors: list[torch.Tensor]) -> None:
            flats[rank] = torch.cat([t.reshape(-1) for t in tensors])
            barrier.wait()
            total = sum(flats[1:], flats[0].clone())
            barrier.wait()
            off = 0
            for t in tensors:
                t.copy_(total[off : off + t.numel()].view_as(t))
                off += t.numel()
        return reduce

    return [of(r) for r in range(world)]


@pytest.mark.parametrize("world, batch_size", [(2, 3), (3, 2), (2, 1)])
def test_instruction_tune_sharded_takes_the_steps_of_one_process(tiny_chat_tokenizer, world, batch_size):
    """``shard=(rank, world)`` (``world`` threads here, summing like ``Dist.all_reduce_sum``):
    the losses and the adapter of one process, to rounding; a process beyond a batch's rows
    (batch_size < world) trains on none and still takes the step."""
    import copy
    import threading

    from transformers import AutoModelForCausalLM

    from milp.data import Record
    from milp.pipeline import add_instruction_adapter, instruction_tune

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer)))

    recs = [Record(f"u{i}", "", ["h"], q, r) for i, (q, r) in enumerate(
        [("My knee hurts. Is it serious?", "See a doctor."), ("Headache for three days?", "Drink water, rest."),
         ("I take ibuprofen.", "That is fine for short-term pain."), ("What should I do?", "Rest.")])]

    models = [copy.deepcopy(base) for _ in range(world + 1)]  # made here: the threads draw no random numbers

    def tune(model, shard=None, all_reduce=None):
        adapter = add_instruction_adapter(model, rank=2, seed=0)
        losses = instruction_tune(model, tiny_chat_tokenizer, recs, adapter=adapter, steps=3, batch_size=batch_size,
                                  lr=1e-2, seed=5, shard=shard, all_reduce=all_reduce, progress=False)
        return losses, adapter.state_dict()

    want = tune(models[world])
    got: dict[int, object] = {}
    reduces = _threads_all_reduce(world)

    def rank(r: int) -> None:
        got[r] = tune(models[r], (r, world), reduces[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(world))
    for losses, state in got.values():
        assert losses == pytest.approx(want[0], rel=1e-6)
        # to rounding, as Adam scales it where a gradient is near 0: 1% of a step of lr 1e-2
        assert all(torch.allclose(state[k], want[1][k], rtol=0, atol=1e-4) for k in want[1])


@pytest.mark.parametrize("shard, all_reduce", [((2, 2), True), ((0, 0), True), ((-1, 2), True), ([0, 2], True),
                                               ((0, 2.0), True), ((0, 2), False)])
def test_instruction_tune_refuses_a_bad_shard(tiny_chat_tokenizer, shard, all_reduce):
    from milp import tiny_model
    from milp.data import Record
    from milp.pipeline import add_instruction_adapter, instruction_tune

    model = tiny_model("llama")
    add_instruction_adapter(model, rank=2)
    with pytest.raises(ValueError, match="shard"):
        instruction_tune(model, tiny_chat_tokenizer, [Record("u", "", ["h"], "Hi?", "Hello.")], steps=1,
                         shard=shard, all_reduce=(lambda ts: None) if all_reduce else None, progress=False)


def _failing(*args, **kwargs):
    raise RuntimeError("injected failure")


if __name__ == "__main__":  # a process of _torchrun's: milp.train, stopped or failing as $MILP_TEST_* say
    rank, _, spec = os.environ.get("MILP_TEST_STOP", "").partition(":")
    if spec and rank == os.environ["RANK"]:
        os.replace = _stopping_replace(spec, os.replace)
    rank, _, name = os.environ.get("MILP_TEST_FAIL", "").partition(":")
    if name and rank == os.environ["RANK"]:
        assert callable(getattr(train, name)), name
        setattr(train, name, _failing)
    if os.environ.get("MILP_TEST_PROG") == "evaluate":
        from test_evaluate import FakeEmbedder  # this file's folder is the script's: on sys.path

        import milp.evaluate
        import milp.models

        milp.models.load_default_embedder = lambda *a, **k: FakeEmbedder()
        sys.exit(milp.evaluate.main(sys.argv[1:]))
    sys.exit(train.main(sys.argv[1:]))
