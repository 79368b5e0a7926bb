"""Tests of ``python -m milp.train`` on a tiny local checkpoint and a few shipped MedDia users."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from run_outputs import run_outputs  # tests/milp is on sys.path (pytest's rootdir-relative import)
from safetensors.torch import load_file

import milp.pipeline
import milp.train as train
import search.loop
from milp.config import MemoryConfig
from milp.data import write_jsonl

FAST = ["--users", "7", "--memory-steps", "2", "--instruct-steps", "2", "--max-new-tokens", "3",
        "--max-length", "96", "--no-progress"]


def _run(ckpt: Path, out: Path, *extra: str) -> int:
    return train.main(["--model", str(ckpt), "--output", str(out), *FAST, *extra])


def test_end_to_end_writes_every_output(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out) == 0
    printed = capsys.readouterr().out
    assert "| MiLP |" in printed and "ROUGE-L" in printed and "Persona-F1" in printed
    split = json.loads((out / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [5, 1, 1]
    users = sorted(split["train"] + split["val"] + split["test"])
    for u in users:
        d = out / "users" / train.user_dirname(u)
        assert MemoryConfig.from_json(d / "memory_config.json") == MemoryConfig.uniform(2, 2, 8)
        tensors = load_file(str(d / "adapters.safetensors"))
        assert tensors["layers.0.mlp.up_proj.lora_A"].shape == (16, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rouge1", "rougeL", "persona_f1", "parameters_per_user", "memory_loss_first", "base"):
        assert key in metrics
    assert metrics["n_test_users"] == 1 and metrics["parameters_per_user"] == MemoryConfig.uniform(2, 2, 8) \
        .num_parameters([[(32, 64), (32, 64), (64, 32)]] * 2)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["user_id"] for p in preds] == split["test"]
    losses = json.loads((out / "memory_losses.json").read_text())
    assert sorted(losses) == users and all(len(v) == 2 for v in losses.values())
    assert set(load_file(str(out / "instruction_adapter.safetensors"))) == {
        f"lora_{m}.model__layers__{i}__self_attn__{p}_proj" for m in "AB" for i in (0, 1) for p in "qv"}
    assert not list(out.rglob("*.tmp*"))


def test_interrupted_run_resumes_without_redoing_work(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = milp.pipeline.instruction_tune

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "instruction_tune", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_checkpoint, out)
    saved = {p: p.stat().st_mtime_ns for p in (out / "users").rglob("adapters.safetensors")}
    assert len(saved) == 7 and not (out / "metrics.json").exists()
    calls = []
    monkeypatch.setattr(train, "instruction_tune", lambda *a, **k: calls.append(1) or real(*a, **k))
    injected = []
    real_inject = train.memory_inject
    monkeypatch.setattr(train, "memory_inject", lambda *a, **k: injected.append(1) or real_inject(*a, **k))
    assert _run(tiny_checkpoint, out) == 0
    assert calls == [1] and injected == []  # memory injection was not redone
    assert {p: p.stat().st_mtime_ns for p in (out / "users").rglob("adapters.safetensors")} == saved
    assert (out / "metrics.json").exists()
    # a third run finds everything done
    monkeypatch.setattr(train, "instruction_tune", boom)
    assert _run(tiny_checkpoint, out) == 0


def _assert_same_run(out: Path, want: Path) -> None:
    """``out`` holds exactly the files of the run in ``want`` (timings aside), and no debris:
    no temp file, no moved-aside folder, no rank part file of the losses."""
    got, ref = run_outputs(out), run_outputs(want)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".old-" in p.name or ".rank" in p.name]


def _stop_and_resume(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], stop: str) -> None:
    """Run ``args`` straight, then again in another directory stopped at the write ``stop``
    (``KeyboardInterrupt`` from it, before it writes anything) and resumed; both must end with
    the same files, and the stopped one without debris.

    The writes: each ``os.replace`` (every atomic publish) named by its target, each append to a
    search's trial log by what it holds (``header``, ``trial N``); ``user folder N`` is the N-th
    user folder published."""
    real_replace, real_append = os.replace, search.loop.append_record
    writes: list[list[str]] = []
    at = -1

    def write(names: list[str]) -> None:
        if len(writes) == at:
            raise KeyboardInterrupt
        writes.append(names)

    def replacing(src, dst):
        write([Path(dst).name])
        return real_replace(src, dst)

    def appending(path, record):
        records = record if isinstance(record, list) else [record]
        write([f"trial {r['trial_id']}" if r.get("type") == "trial" else str(r.get("type")) for r in records])
        return real_append(path, record)

    monkeypatch.setattr(os, "replace", replacing)
    monkeypatch.setattr(search.loop, "append_record", appending)
    want = tmp_path / "straight"
    assert train.main(["--model", str(ckpt), "--output", str(want), *args]) == 0
    if m := re.fullmatch(r"user folder (\d+)", stop):
        at = [i for i, w in enumerate(writes) if w[0].startswith("meddia-")][int(m.group(1)) - 1]
    else:
        at = next(i for i, w in enumerate(writes) if stop in w)
    writes.clear()
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train.main(["--model", str(ckpt), "--output", str(out), *args])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(search.loop, "append_record", real_append)
    assert train.main(["--model", str(ckpt), "--output", str(out), *args]) == 0
    _assert_same_run(out, want)


#: where a run is stopped: the file being published (``os.replace``) when the process dies,
#: one or more per stage; with ``--slots 2`` the 3rd user's folder comes mid-way through memory
#: injection's second group of users; with ``--slots 64`` all 7 users train in one group and the
#: 2nd user's folder comes after the 1st user of that group was saved
_STOPS = [("split.json", 2), ("user folder 3", 2), ("user folder 2", 64), ("memory_losses.json", 2),
          ("instruction.json", 2), ("predictions.jsonl", 2), ("metrics.json", 2)]


@pytest.mark.parametrize("stop, slots", _STOPS)
def test_a_run_stopped_at_any_write_resumes_to_the_same_results(tiny_checkpoint, tmp_path, monkeypatch, stop,
                                                               slots):
    """Stopped while publishing any of its files (``KeyboardInterrupt`` from that ``os.replace``)
    and run again, a run ends with exactly the files of a run never stopped, and no debris.
    (Sweeps over all 28 writes of this run, and over all 25 with ``--slots 64``, passed the same
    way.) A group of users stopped part-way through its saving trains whole again: trained in a
    smaller group, the users not yet saved came out with adapters different in the last bits."""
    _stop_and_resume(tiny_checkpoint, tmp_path, monkeypatch, [*FAST, "--slots", str(slots)], stop)


def test_a_run_killed_while_appending_a_groups_losses_resumes_to_the_same_results(tiny_checkpoint, tmp_path,
                                                                                   monkeypatch):
    """Killed part-way through writing the second group's line of losses (a torn line: the
    crash left half of it, as SIGKILL or a power loss can), a run resumes to the files of a run
    never stopped: the torn line is skipped, that group trains again and its line lands on a
    line of its own. (The losses were one JSON object of every user so far, rewritten per group.)"""
    import search.trial_log

    args = [*FAST, "--slots", "2"]
    want = tmp_path / "straight"
    assert train.main(["--model", str(tiny_checkpoint), "--output", str(want), *args]) == 0
    real = search.trial_log.append_record
    appended = []

    def torn(path, record):
        if Path(path).name.startswith("memory_losses.") and len(appended) == 1:
            line = json.dumps(record).encode()
            with open(path, "ab") as f:
                f.write(line[: len(line) // 2])
            raise KeyboardInterrupt
        appended.append(record)
        return real(path, record)

    monkeypatch.setattr(search.trial_log, "append_record", torn)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train.main(["--model", str(tiny_checkpoint), "--output", str(out), *args])
    part = out / "memory_losses.rank0.jsonl"
    assert len(part.read_bytes().splitlines()) == 2 and not part.read_bytes().endswith(b"\n")
    assert len(list((out / "users").iterdir())) == 2  # the first group only
    monkeypatch.setattr(search.trial_log, "append_record", real)
    assert train.main(["--model", str(tiny_checkpoint), "--output", str(out), *args]) == 0
    _assert_same_run(out, want)


#: the flags of a small configuration search (5 configurations, rounds of 3: Sobol, then GP)
SEARCH = ["--search", "5", "--search-q", "3", "--search-surrogate", "gp", "--search-modules", "0-3",
          "--search-ranks", "4,8", "--search-init", "3"]


@pytest.mark.parametrize("stop", [
    "reference.json",
    "trial 1",  # failed before run() told a round in one log write (search/loop.py)
    "search_pareto.png",
    "selected.json",
])
def test_a_search_run_stopped_at_any_write_resumes_to_the_same_results(tiny_checkpoint, tmp_path, monkeypatch,
                                                                      stop):
    """The same with ``--search``: stopped at the reference's file, at the trial log's append of
    the first round (``trial 1``: trials 0-2, one write), at the plots, at the pick; the resumed
    search ends with the trial log (timings aside), pick and results of a run never stopped.
    (A sweep over all 32 writes of this run, trial-log appends included, passed the same way.
    Before ``Search.run`` wrote each round in one append, the stops inside a round, at trials
    1, 2 and 4 of 35 writes, resumed into another search.)"""
    _stop_and_resume(tiny_checkpoint, tmp_path, monkeypatch, [*FAST, *SEARCH], stop)


def test_a_run_an_older_version_saved_under_case_sensitive_names_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    """Before 2026-12-06 a user "Alice" was saved in users/Alice and predictions/Alice.json;
    now that is Alice-<hash> (case-insensitive file systems kept "Alice" and "alice" in one
    folder). A run left by the older version resumes: its folders and prediction files are
    renamed, no user is trained or answered again, and the results equal a run of this version."""
    from dataclasses import replace

    from milp.store import _dirname

    records = [replace(r, user_id=r.user_id.upper()) for r in train.load_records(None)[:7]]
    data = write_jsonl(records, tmp_path / "upper.jsonl")
    args = ["--data", str(data)]
    want = tmp_path / "new"
    assert _run(tiny_checkpoint, want, *args) == 0
    old = tmp_path / "old"
    import shutil

    shutil.copytree(want, old)
    renamed = 0
    for folder, suffix in (("users", ""), ("predictions", ".json")):
        for r in records:
            new_name = train.user_dirname(r.user_id) + suffix
            if (old / folder / new_name).exists():
                (old / folder / new_name).rename(old / folder / (_dirname(r.user_id, portable=False) + suffix))
                renamed += 1
    assert renamed == 8  # 7 users, 1 test user's predictions
    for name in ("metrics.json", "predictions.jsonl", "results.md"):
        (old / name).unlink()
    redone = []
    monkeypatch.setattr(train, "memory_inject", lambda *a, **k: redone.append("memory"))
    monkeypatch.setattr(train, "generate_responses", lambda *a, **k: redone.append("answers"))
    assert _run(tiny_checkpoint, old, *args) == 0
    assert redone == []
    got, ref = run_outputs(old), run_outputs(want)
    assert sorted(got) == sorted(ref) and [k for k in ref if got[k] != ref[k]] == []


def test_resuming_with_other_settings_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out) == 0
    with pytest.raises(SystemExit, match="rank: 8 -> 4"):
        _run(tiny_checkpoint, out, "--rank", "4")
    assert _run(tiny_checkpoint, out, "--rank", "4", "--overwrite") == 0


def test_search_picks_a_configuration_and_resumes(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["--search", "5", "--search-q", "3", "--search-surrogate", "gp", "--search-modules", "0-3",
            "--search-ranks", "4,8", "--search-init", "3"]
    assert _run(tiny_checkpoint, out, *args) == 0
    sel = json.loads((out / "search" / "selected.json").read_text())
    assert sel["n_trials"] == 5 and sel["reference"]["parameters"] > 0
    trials = [json.loads(x) for x in (out / "search" / "trials.jsonl").read_text().splitlines()]
    assert sum(1 for t in trials if t.get("status") in ("ok", "failed")) == 5
    cfg = MemoryConfig.from_dict(sel["memory_config"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert MemoryConfig.from_dict(metrics["memory_config"]) == cfg
    assert (out / "search" / "search_pareto.png").exists()


def test_search_dims_hold_the_other_dimensions(tiny_checkpoint, tmp_path):
    """Table 4 ablation: searching only the rank keeps every layer on with --modules modules."""
    out = tmp_path / "run"
    args = ["--search", "3", "--search-q", "3", "--search-surrogate", "gp", "--search-ranks", "4,8,16",
            "--search-init", "2", "--search-dims", "size", "--modules", "1"]
    assert _run(tiny_checkpoint, out, *args) == 0
    trials = [json.loads(x) for x in (out / "search" / "trials.jsonl").read_text().splitlines()]
    header, done = trials[0], [t for t in trials if t.get("status") == "ok"]
    assert header["space"]["search_layers"] is False and header["space"]["dim"] == 2
    assert len(done) == 3 and sorted(t["config"]["ranks"][0] for t in done) == [4, 8, 16]
    for t in done:
        assert all(t["config"]["layer_mask"]) and set(t["config"]["modules"]) == {1}
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--search-dims", "size,depth"])


def test_bad_input_is_reported(tiny_checkpoint, tmp_path, capsys):
    assert train.main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "a"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "b"), *FAST]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="at least 3 users"):
        _run(tiny_checkpoint, tmp_path / "c", "--users", "2")
    with pytest.raises(SystemExit, match="--layers"):
        _run(tiny_checkpoint, tmp_path / "d", "--layers", "0,5")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--search-modules", "5-2"])
    assert "inverted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--search-ranks", "8,-1"])


def test_user_jsonl_with_a_malformed_line(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl([{"user_id": f"u{i}", "profile": "", "history": [f"I like tea {i}"], "query": "Hi?",
                  "response": "Hello."} for i in range(4)], data)
    with data.open("a") as f:
        f.write("{not json\n")
    assert train.main(["--model", str(tiny_checkpoint), "--data", str(data), "--output", str(tmp_path / "a"),
                       *FAST]) == 2
    assert f"{data}:5" in capsys.readouterr().err
    assert not (tmp_path / "a" / "users").exists()
    assert train.main(["--model", str(tiny_checkpoint), "--data", str(data), "--output", str(tmp_path / "b"),
                       "--on-error", "skip", *FAST]) == 0


# torchrun: tests/milp/test_torchrun_props.py (2 processes against one, every output file)


def test_pick_rule_includes_the_reference():
    from types import SimpleNamespace as NS

    def trial(i, ce, params):
        return NS(trial_id=i, ok=True, values={"val_ce": ce, "parameters": params},
                  config={"layer_mask": [True, False], "modules": 1, "ranks": 8})

    ref = {"val_ce": 1.00, "parameters": 100, "memory_config": MemoryConfig.uniform(2, 2, 8).to_dict()}
    s = NS(trials=[trial(0, 1.005, 40), trial(1, 0.999, 90), trial(2, 1.2, 1)])
    cfg, pick = train._pick(s, ref, 0.01, 16.0, 2)
    assert pick.trial_id == 0 and cfg.layer_mask == (True, False)  # within 1% of the best, fewest parameters
    cfg, pick = train._pick(s, ref, 0.0, 16.0, 2)
    assert pick.trial_id == 1  # strict: the best loss
    cfg, pick = train._pick(NS(trials=[trial(0, 1.5, 40)]), ref, 0.01, 16.0, 2)
    assert pick is None and cfg == MemoryConfig.uniform(2, 2, 8)  # nothing near: the reference
    # a configuration without memory is never picked, nor sets the best loss the others must come near
    s = NS(trials=[trial(0, 0.95, 0), trial(1, 1.004, 40), trial(2, 1.2, 1)])
    cfg, pick = train._pick(s, ref, 0.01, 16.0, 2)
    assert pick.trial_id == 1
    cfg, pick = train._pick(NS(trials=[trial(0, 0.5, 0)]), ref, 0.01, 16.0, 2)
    assert pick is None and cfg == MemoryConfig.uniform(2, 2, 8)
