"""``python -m milp.add_users`` on damaged bookkeeping and changed data: refused by name before
anything is trained or written, never a traceback after the work, never a stale user kept
silently."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import milp.train as train
from milp.add_users import add_users, main
from milp.data import Record, write_jsonl
from milp.store import user_dirname


@pytest.fixture
def run(answer_run, tmp_path) -> Path:
    """A copy of the session's finished run (``--slots 2``, 7 MedDia users), to change."""
    return Path(shutil.copytree(answer_run, tmp_path / "run"))


def _new_records(run: Path, n: int) -> list[Record]:
    split = json.loads((run / "split.json").read_text())
    held = set(split["train"] + split["val"] + split["test"])
    return [r for r in train.load_records(None) if r.user_id not in held][:n]


def _saved(run: Path, user: str) -> bool:
    return (run / "users" / user_dirname(user) / "user.json").is_file()


def _with_damaged_file(run: Path, tmp_path: Path, name: str, content: str):
    """One new user's records (and their data file) for a call on ``run`` whose
    ``RUN/added/<name>`` holds ``content``."""
    new = _new_records(run, 1)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    (run / "added").mkdir()
    (run / "added" / name).write_text(content)
    return new, data


@pytest.mark.parametrize("content, why", [("[\"meddia-d2-0000\",", "JSONDecodeError"),
                                          ('"meddia-d2-0000"', "got a JSON str")])
def test_a_damaged_claims_file_is_refused_by_name_before_anything_is_written(run, tmp_path, content, why):
    """RUN/added/claimed.json not JSON stopped the call with a JSONDecodeError traceback; a JSON
    string was read as the set of its characters (and so let through)."""
    new, data = _with_damaged_file(run, tmp_path, "claimed.json", content)
    with pytest.raises(SystemExit, match=rf"milp.add_users: .*claimed.json is damaged \({why}.*expected a JSON "
                                         rf"object of the user ids"):
        add_users(run, data, progress=False)
    assert not _saved(run, new[0].user_id)


@pytest.mark.parametrize("content", ["{\"meddia-d2-0000\": [6.0,", "[6.0]"])
def test_a_damaged_losses_file_is_refused_before_any_user_is_trained(run, tmp_path, content):
    """A damaged RUN/added/memory_losses.json failed only when the losses were merged, after
    every user was trained and saved (a JSONDecodeError, or AttributeError for a list), and a
    call run again failed there again."""
    new, data = _with_damaged_file(run, tmp_path, "memory_losses.json", content)
    with pytest.raises(SystemExit, match=r"milp.add_users: .*memory_losses.json is damaged .*expected a JSON object "
                                         r"of each user's losses"):
        add_users(run, data, progress=False)
    assert not _saved(run, new[0].user_id)
    assert sorted(p.name for p in (run / "added").iterdir()) == ["memory_losses.json"]


@pytest.mark.parametrize("name, content, why", [
    ("memory_losses.rank0.jsonl", '{"t": 1, "losses": [6.0]}\n', r"rank0.jsonl:1 is damaged: expected a JSON object"),
    ("memory_losses.rank1.json", '{"meddia-d2-0000": [6.0,', r"rank1.json is damaged: Expecting value"),
])
def test_a_damaged_losses_part_file_is_refused_before_any_user_is_trained(run, tmp_path, name, content, why):
    """A stopped call's part file of losses (or an older version's) that the merge could not
    read is refused by name before anything is trained. A torn last line is not damage: it is
    what a crash while appending leaves (tests/milp/test_train.py)."""
    new, data = _with_damaged_file(run, tmp_path, name, content)
    with pytest.raises(SystemExit, match=r"milp.add_users: .*" + why + r".*delete the file to go on"):
        add_users(run, data, progress=False)
    assert not _saved(run, new[0].user_id)
    assert sorted(p.name for p in (run / "added").iterdir()) == [name]


@pytest.mark.parametrize("rank", ["one", ""])
def test_a_malformed_rank_is_refused_by_name_before_anything_is_written(run, tmp_path, monkeypatch, rank):
    """Was: ValueError "invalid literal for int() with base 10: 'one'", not naming RANK."""
    new = _new_records(run, 1)
    data = write_jsonl(new, tmp_path / "new.jsonl")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit, match=rf"milp.add_users: RANK \(set by torchrun\) must be an int, got '{rank}'"):
        add_users(run, data, progress=False)
    assert not (run / "added").exists()


def test_a_user_added_before_from_another_history_is_refused_not_kept_silently(run, tmp_path):
    """A user an earlier call added counts as that call's work, resumed: given again with
    another history, it was "resumed" too (its old adapters kept, its old losses returned) with no
    word. It is refused as a user the run holds; the same data again still resumes."""
    rec = _new_records(run, 1)[0]
    first = write_jsonl([rec], tmp_path / "first.jsonl")
    losses = add_users(run, first, progress=False)
    changed = Record(rec.user_id, rec.profile, ["I have been vegetarian for ten years.", *rec.history], rec.query,
                     rec.response)
    adapters = (run / "users" / user_dirname(rec.user_id) / "adapters.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=rf"already holds 1 of these users.*added by an earlier milp.add_users call "
                                         rf"from another history.*{rec.user_id}"):
        add_users(run, write_jsonl([changed], tmp_path / "changed.jsonl"), progress=False)
    assert (run / "users" / user_dirname(rec.user_id) / "adapters.safetensors").read_bytes() == adapters
    assert add_users(run, first, progress=False) == losses  # the same data: resumed (nothing to do)


def test_an_unreadable_model_is_an_error_message_not_a_traceback(run, tmp_path, capsys):
    """milp.train and milp.answer report a run whose model is gone as ``error: ...`` (exit 2);
    milp.add_users raised the ValueError."""
    ran = json.loads((run / "run.json").read_text())
    ran["settings"]["model"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(ran))
    data = write_jsonl(_new_records(run, 1), tmp_path / "new.jsonl")
    assert main([str(run), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("milp.add_users: error: ") and "gone" in err and "does not exist" in err


def test_the_run_users_folder_is_read_once_not_once_per_new_user(run, tmp_path, monkeypatch):
    """Telling the run's users from new ones asked the store ``u in store`` for each new user:
    a miss re-reads the whole users/ folder (every user.json), so adding N users to a run of M
    read N x M files. One read of the folder answers for all of them."""
    import milp.store

    reads = []
    real = milp.store.UserStore.refresh
    monkeypatch.setattr(milp.store.UserStore, "refresh", lambda self: (reads.append(1), real(self))[1])
    new = _new_records(run, 3)
    losses = add_users(run, write_jsonl(new, tmp_path / "new.jsonl"), progress=False)
    assert sorted(losses) == sorted(r.user_id for r in new) and all(_saved(run, r.user_id) for r in new)
    assert len(reads) == 1
