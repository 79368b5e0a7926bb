"""``python -m milp.add_users``: new users' memory injected into a finished run, served at once."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import milp.train as train
from milp.add_users import add_users, main
from milp.answer import answer
from milp.config import MemoryConfig
from milp.data import write_jsonl
from milp.store import user_dirname


@pytest.fixture
def run(answer_run, tmp_path) -> Path:
    """A copy of the session's finished run (``--slots 2``, 7 MedDia users), to change."""
    return Path(shutil.copytree(answer_run, tmp_path / "run"))


def _run_users(run: Path) -> list[str]:
    split = json.loads((run / "split.json").read_text())
    return sorted(split["train"] + split["val"] + split["test"])


def _new_records(run: Path, n: int):
    """``n`` shipped MedDia users the run does not hold."""
    held = set(_run_users(run))
    return [r for r in train.load_records(None) if r.user_id not in held][:n]


def _adapters(run: Path, user: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "users" / user_dirname(user) / "adapters.safetensors"))


def test_a_user_gets_the_adapters_the_run_gave_it(run, tmp_path):
    """A run user injected again through add_users (its folder deleted) gets the run's
    adapters and losses, to rounding (it shared batches with other users in the run)."""
    user = json.loads((run / "split.json").read_text())["test"][0]
    want = _adapters(run, user)
    want_losses = json.loads((run / "memory_losses.json").read_text())[user]
    shutil.rmtree(run / "users" / user_dirname(user))
    data = write_jsonl([r for r in train.load_records(None) if r.user_id == user], tmp_path / "again.jsonl")
    losses = add_users(run, data, progress=False)
    assert list(losses) == [user] and losses[user] == pytest.approx(want_losses, rel=1e-5)
    got = _adapters(run, user)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_new_users_are_saved_with_the_run_config_and_answered(run, tmp_path, capsys):
    new = _new_records(run, 3)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    assert main([str(run), "--data", str(data), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "milp.add_users: 3 users in" in printed and "memory-injection loss" in printed
    config = MemoryConfig.from_json(run / "users" / user_dirname(_run_users(run)[0]) / "memory_config.json")
    for r in new:
        assert MemoryConfig.from_json(run / "users" / user_dirname(r.user_id) / "memory_config.json") == config
    losses = json.loads((run / "added" / "memory_losses.json").read_text())
    assert sorted(losses) == sorted(r.user_id for r in new) and all(len(v) == 2 for v in losses.values())
    # the run's own record of its users is untouched
    assert sorted(json.loads((run / "memory_losses.json").read_text())) == _run_users(run)
    out = answer(run, [(r.user_id, "What should I do about a cough?") for r in new], progress=False)
    assert len(out) == 3 and all(isinstance(a, str) for a in out)
    assert not list(run.rglob("*.tmp*"))


def test_only_the_named_users_are_injected(run, tmp_path):
    new = _new_records(run, 3)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    losses = add_users(run, data, users=[new[1].user_id], progress=False)
    assert list(losses) == [new[1].user_id]
    assert not (run / "users" / user_dirname(new[0].user_id)).exists()


def _stop_in_the_second_group(run: Path, data: Path, monkeypatch):
    """Run add_users on ``run`` stopped (KeyboardInterrupt) as its second group starts training;
    returns the real memory_inject, put back."""
    real, calls = train.memory_inject, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "memory_inject", stop_second)
    with pytest.raises(KeyboardInterrupt):
        add_users(run, data, progress=False)
    monkeypatch.setattr(train, "memory_inject", real)
    return real


def test_a_stopped_call_resumes_to_the_adapters_of_one_never_stopped(run, tmp_path, monkeypatch):
    """Three new users, two slots: two groups. A call stopped in the second group's training,
    run again, skips the saved group and ends with the adapters of a straight call."""
    new = _new_records(run, 3)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    straight = Path(shutil.copytree(run, tmp_path / "straight"))
    add_users(straight, data, progress=False)
    _stop_in_the_second_group(run, data, monkeypatch)
    saved = [r.user_id for r in new if (run / "users" / user_dirname(r.user_id) / "user.json").is_file()]
    assert len(saved) == 2
    losses = add_users(run, data, progress=False)  # its own saved users are not refused as the run's
    assert losses == add_users(straight, data, progress=False)
    for r in new:
        a, b = _adapters(run, r.user_id), _adapters(straight, r.user_id)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_call_an_older_version_stopped_resumes_without_training_its_saved_users(run, tmp_path, monkeypatch):
    """Before 2026-12-06 a user "NEW-1" was saved in users/NEW-1 (now NEW-1-<hash>). A call the
    older version stopped after saving the first group (two slots) resumes: that folder gets the
    user's current name and only the second group trains."""
    from dataclasses import replace

    from milp.store import _dirname

    new = [replace(r, user_id=f"NEW-{i}") for i, r in enumerate(_new_records(run, 3))]
    data = write_jsonl(new, tmp_path / "new.jsonl")
    real = _stop_in_the_second_group(run, data, monkeypatch)
    saved = [r.user_id for r in new if (run / "users" / user_dirname(r.user_id)).is_dir()]
    assert saved == ["NEW-0", "NEW-1"]
    for u in saved:  # what the older version left
        (run / "users" / user_dirname(u)).rename(run / "users" / _dirname(u, portable=False))
    trained = []
    monkeypatch.setattr(train, "memory_inject", lambda rt, recs, *a, **k: (trained.extend(r.user_id for r in recs),
                                                                            real(rt, recs, *a, **k))[1])
    losses = add_users(run, data, progress=False)
    assert trained == ["NEW-2"] and sorted(losses) == ["NEW-0", "NEW-1", "NEW-2"]
    assert sorted(p.name for p in (run / "users").iterdir() if p.name.startswith("NEW")) == sorted(
        user_dirname(r.user_id) for r in new)


def test_users_an_earlier_call_saved_are_not_trained_again(run, tmp_path, monkeypatch):
    """A call of --user X, then one of X, Y, Z (two slots): the second trained X again, in one
    group with Y (the groups were cut from all three), and threw the result away. Now it trains
    Y and Z together, and X's adapters and losses are the first call's."""
    new = _new_records(run, 3)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    first = new[0].user_id
    add_users(run, data, users=[first], progress=False)
    kept = (run / "users" / user_dirname(first) / "adapters.safetensors").read_bytes()
    real, trained = train.memory_inject, []
    monkeypatch.setattr(train, "memory_inject", lambda rt, recs, *a, **k: (trained.append([r.user_id for r in recs]),
                                                                            real(rt, recs, *a, **k))[1])
    losses = add_users(run, data, progress=False)
    assert trained == [sorted(r.user_id for r in new[1:])]
    assert sorted(losses) == sorted(r.user_id for r in new) and all(losses.values())
    assert (run / "users" / user_dirname(first) / "adapters.safetensors").read_bytes() == kept


def test_users_the_run_holds_are_refused_before_anything_is_written(run, tmp_path):
    held = _run_users(run)[0]
    data = write_jsonl([r for r in train.load_records(None) if r.user_id == held] + _new_records(run, 1),
                       tmp_path / "mixed.jsonl")
    before = sorted(p.name for p in (run / "users").iterdir())
    with pytest.raises(SystemExit, match=f"already holds 1 of these users.*{held}"):
        add_users(run, data, progress=False)
    assert sorted(p.name for p in (run / "users").iterdir()) == before and not (run / "added").exists()


@pytest.mark.parametrize("case, match", [
    ("no run", "not a milp.train output directory"),
    ("unknown user", "--user 'nobody' has no record"),
    ("search unfinished", "has not picked a configuration yet"),
    ("missing data", "does not exist"),
])
def test_bad_input_is_refused_by_name(run, tmp_path, case, match):
    data = write_jsonl(_new_records(run, 1), tmp_path / "new.jsonl")
    target, kw = run, {}
    if case == "no run":
        target = tmp_path / "elsewhere"
        target.mkdir()
    elif case == "unknown user":
        kw = dict(users=["nobody"])
    elif case == "search unfinished":
        ran = json.loads((run / "run.json").read_text())
        ran["settings"]["search"] = 4
        (run / "run.json").write_text(json.dumps(ran))
    else:
        data = tmp_path / "absent.jsonl"
    with pytest.raises(SystemExit, match=match):
        add_users(target, data, progress=False, **kw)
    assert not (run / "added").exists()


def test_a_second_call_on_the_same_run_is_refused_while_the_first_runs(run, tmp_path):
    """Two calls at once both rewrite RUN/added/claimed.json and the losses: the second is
    refused by name while the first holds the run (a lock on the run's folder, no file)."""
    import fcntl
    import os

    data = write_jsonl(_new_records(run, 1), tmp_path / "new.jsonl")
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running call holds
        with pytest.raises(SystemExit, match="another milp.add_users call is adding users to"):
            add_users(run, data, progress=False)
        # the lock comes before the run's state (and the data) is read: what a call read while the
        # other was finishing was stale once it got the lock
        with pytest.raises(SystemExit, match="another milp.add_users call is adding users to"):
            add_users(run, tmp_path / "missing.jsonl", progress=False)
    finally:
        os.close(fd)
    assert len(add_users(run, data, progress=False)) == 1  # once it has ended
    assert not list(run.glob("*.lock")) and sorted(p.name for p in (run / "added").iterdir()) == [
        "call.json", "claimed.json", "memory_losses.json"]
