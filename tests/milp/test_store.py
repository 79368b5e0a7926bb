"""UserStore: a runtime with few slots serves (and trains) any user saved in a store, loading
on demand and evicting the least recently used store users."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.runtime import MilpRuntime
from milp.store import CacheInfo, UserStore, user_dirname

USERS = ["u0", "u1", "u2", 3, "a/b"]  # an int id and one needing a hashed directory name
PROMPT = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def store_dir(tmp_path):
    """Five saved users with different configs, and each one's logits on PROMPT."""
    writer = MilpRuntime(tiny_model("llama"), max_users=len(USERS))
    want = {}
    for i, u in enumerate(USERS):
        cfg = MemoryConfig((True, i % 2 == 0), (1 + i % 3, 1), (4 * (i + 1), 8))
        writer.add_user(u, cfg, init="random", seed=i)
        writer.save_user(u, tmp_path / user_dirname(u))
        with torch.no_grad():
            want[u] = writer.forward(PROMPT, u).logits[0]
    with torch.no_grad():
        want[None] = writer.forward(PROMPT, None).logits[0]
    return tmp_path, want


def check_rows(rt, batch, want):
    with torch.no_grad():
        got = rt.forward(PROMPT.repeat(len(batch), 1), batch).logits
    for row, u in zip(got, batch):
        torch.testing.assert_close(row, want[u], rtol=1e-5, atol=1e-5)


def test_loads_on_demand_and_evicts_least_recently_used(store_dir):
    root, want = store_dir
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root))
    check_rows(rt, ["u0", "u1"], want)
    assert rt.users == ["u0", "u1"] and rt.cache_info() == CacheInfo(0, 2, 0, 0)
    check_rows(rt, ["u0", None, "u0"], want)  # a hit; u1 is now the least recently used
    check_rows(rt, [3], want)
    assert rt.users == ["u0", 3] and rt.cache_info() == CacheInfo(1, 3, 1, 0)
    check_rows(rt, ["a/b", "u0"], want)  # 3 goes, not the more recently used u0
    assert rt.users == ["u0", "a/b"]
    check_rows(rt, ["u1", "u2"], want)
    assert rt.users == ["u1", "u2"] and rt.cache_info() == CacheInfo(2, 6, 4, 0)


def test_refuses_batches_it_cannot_place_without_changing_anything(store_dir):
    root, want = store_dir
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root))
    rt.add_user("pinned", MemoryConfig.uniform(2, 1, 4))
    check_rows(rt, ["u0"], want)
    with pytest.raises(ValueError, match="names 3 distinct users but the runtime holds at most max_users=2"):
        rt.forward(PROMPT.repeat(3, 1), ["u1", "u2", "u0"])
    with pytest.raises(ValueError, match="needs 2 users loaded from the store but only 1 slots can be freed"):
        rt.forward(PROMPT.repeat(2, 1), ["u1", "u2"])
    with pytest.raises(KeyError, match="unknown user 'nobody': not loaded, and UserStore"):
        rt.forward(PROMPT, "nobody")
    assert rt.users == ["pinned", "u0"] and rt.cache_info().evictions == 0
    check_rows(rt, ["u1", "pinned"], want | {"pinned": rt.forward(PROMPT, "pinned").logits[0].detach()})
    assert rt.users == ["pinned", "u1"]  # the directly added user is never evicted


def test_trained_users_are_kept_or_written_back(store_dir):
    root, want = store_dir
    rt = MilpRuntime(tiny_model("llama"), max_users=1, store=UserStore(root))
    rt.train_step(PROMPT, "u0")
    with pytest.raises(ValueError, match=r"trained since loading, e\.g\. \['u0'\]: open the store with write"):
        rt.forward(PROMPT, "u1")
    assert rt.users == ["u0"]

    rt = MilpRuntime(tiny_model("llama"), max_users=1, store=UserStore(root, write_back=True))
    rt.train_step(PROMPT, "u0")
    trained = rt.adapter_state("u0")
    rt.forward(PROMPT, "u1")  # u0 saved back, then evicted
    assert rt.users == ["u1"] and rt.cache_info() == CacheInfo(0, 2, 1, 1)
    info = json.loads((root / "u0" / "user.json").read_text())
    assert info["step"] == 1
    reread = MilpRuntime(tiny_model("llama"), max_users=1)
    reread.load_user(root / "u0")
    for k, v in trained.items():
        torch.testing.assert_close(reread.adapter_state("u0")[k], v, rtol=0, atol=0)
    assert reread.optimizer.step_count(reread.slot("u0")) == 1
    rt.forward(PROMPT, "u0")  # loads the trained copy: its step count carries on, it is clean again
    assert rt.optimizer.step_count(rt.slot("u0")) == 1 and rt.cache_info().write_backs == 1
    rt.forward(PROMPT, "u1")
    assert rt.cache_info().write_backs == 1  # u0 was not trained again: evicted without saving


def test_generate_with_store_users_equals_all_loaded(store_dir):
    root, _ = store_dir
    full = MilpRuntime(tiny_model("llama"), max_users=len(USERS))
    for u in USERS:
        full.load_user(root / user_dirname(u))
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root))
    prompts = PROMPT.repeat(2, 1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for batch in (["u0", "u1"], ["u2", 3], ["a/b", "u0"]):
        torch.testing.assert_close(rt.generate(prompts, batch, **kw), full.generate(prompts, batch, **kw))


def test_store_index_and_errors(store_dir, tmp_path_factory):
    root, _ = store_dir
    store = UserStore(root)
    assert sorted(map(str, store.users())) == sorted(map(str, USERS))
    assert 3 in store and "3" not in store and "a/b" in store and store.path("a/b").name == user_dirname("a/b")
    assert store.save_path("new") == root / "new"
    # a user saved by another process later is found (the index is re-read on a miss)
    other = MilpRuntime(tiny_model("llama"), max_users=1)
    other.add_user("late", MemoryConfig.uniform(2))
    other.save_user("late", root / "some-other-name")
    assert store.path("late") == root / "some-other-name"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        UserStore(tmp_path_factory.mktemp("x") / "missing")
    with pytest.raises(TypeError, match="write_back must be a bool"):
        UserStore(root, write_back="yes")
    with pytest.raises(TypeError, match="store must be a milp.UserStore"):
        MilpRuntime(tiny_model("llama"), store=str(root))


def test_compiled_decode_step_survives_store_swaps(store_dir):
    """A compiled decode step (static cache, as tests/milp/test_runtime.py's) keeps serving while
    the store swaps users in and out: once the banks have seen their largest user (max_rank, a
    high-water mark) and hold enough rows (capacity given), evictions and loads reallocate
    nothing and re-trace nothing: one graph serves every batch, with the eager tokens of a
    runtime holding all users."""
    import torch._dynamo
    from transformers import CompileConfig

    root, _ = store_dir
    full = MilpRuntime(tiny_model("llama"), max_users=len(USERS))
    for u in USERS:
        full.load_user(root / user_dirname(u))
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root), capacity=256)
    for m in (full.model, rt.model):
        m.generation_config.eos_token_id = None
    cc = CompileConfig(fullgraph=True, backend="eager")
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = PROMPT.repeat(2, 1)
    for u in USERS:  # a first round: the banks see every user's rank
        rt.row_slots([u], 1)
    banks = [m.bank.lora_a for m in rt.state.modules()]
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (["u0", "u1"], ["u2", 3], ["a/b", "u0"], ["u1", "u2"]):
        got = rt.generate(ids, batch, cache_implementation="static", compile_config=cc, **gen)
        assert got.tolist() == full.generate(ids, batch, **gen).tolist(), batch
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert all(a is b for a, b in zip(banks, (m.bank.lora_a for m in rt.state.modules())))
    assert rt.cache_info().evictions == 3 + 8  # the first round, then every batch swaps both slots


def test_int_and_str_ids_get_their_own_directories(tmp_path):
    """The int 7 and the string "7" are two users: saving both into one store keeps both (their
    directory names were both "7", and the second save replaced the first)."""
    assert user_dirname(7) != user_dirname("7") == "7" and user_dirname(True) != user_dirname(1)
    writer = MilpRuntime(tiny_model("llama"), max_users=2)
    want = {}
    for i, u in enumerate([7, "7"]):
        writer.add_user(u, MemoryConfig.uniform(2, 1, 4 * (i + 1)), init="random", seed=i)
        writer.save_user(u, tmp_path / user_dirname(u))
        with torch.no_grad():
            want[u] = writer.forward(PROMPT, u).logits[0]
    store = UserStore(tmp_path)
    assert sorted(map(repr, store.users())) == ["'7'", "7"]
    assert store.path(7) != store.path("7")
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=store)
    check_rows(rt, [7, "7"], want)


# ------------------------------------------------------------------------------------------------
# slots are transparent: any sequence of mixed-user forwards and training steps through a runtime
# with fewer slots than users (loading from a write-back store, evicting the least recently used)
# gives what a runtime holding every user gives, losses, logits and final adapters alike


@st.composite
def _sessions(draw):
    slots = draw(st.integers(1, 3))
    ops = []
    for _ in range(draw(st.integers(1, 7))):
        users = draw(st.lists(st.sampled_from(USERS), min_size=1, max_size=slots, unique=True))
        rows = draw(st.lists(st.sampled_from(users + [None]), min_size=1, max_size=4))
        rows += [u for u in users if u not in rows]  # every drawn user has a row
        ops.append((draw(st.sampled_from(["train", "forward"])), rows))
    return slots, ops


@pytest.fixture(scope="module")
def saved_users(tmp_path_factory):
    """The five users of ``store_dir`` saved from a float64 model (training compared exactly)."""
    root = tmp_path_factory.mktemp("saved64")
    writer = MilpRuntime(tiny_model("llama").double(), max_users=len(USERS))
    for i, u in enumerate(USERS):
        writer.add_user(u, MemoryConfig((True, i % 2 == 0), (1 + i % 3, 1), (4 * (i + 1), 8)), init="random",
                        seed=i, total_steps=20)
        writer.save_user(u, root / user_dirname(u))
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(session=_sessions())
def test_a_few_slots_and_a_store_act_as_every_user_loaded(saved_users, tmp_path_factory, session):
    import shutil

    slots, ops = session
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(saved_users, root, dirs_exist_ok=True)
    rt = MilpRuntime(tiny_model("llama").double(), max_users=slots, store=UserStore(root, write_back=True))
    full = MilpRuntime(tiny_model("llama").double(), max_users=len(USERS))
    for u in USERS:
        full.load_user(saved_users / user_dirname(u))
    tokens = torch.Generator().manual_seed(len(ops))
    for kind, rows in ops:
        ids = torch.randint(3, 90, (len(rows), 6), generator=tokens)
        if kind == "train":
            got, want = rt.train_step(ids, rows), full.train_step(ids, rows)
            assert got.keys() == want.keys()
            for u in want:
                assert got[u] == pytest.approx(want[u], rel=1e-12, abs=1e-12), (u, ops)
        else:
            with torch.no_grad():
                torch.testing.assert_close(rt.forward(ids, rows).logits, full.forward(ids, rows).logits,
                                           rtol=1e-12, atol=1e-12)
        assert len(rt.users) <= slots
    for u in USERS:  # each one loaded (written back and reloaded as needed): adapters and step counts
        with torch.no_grad():
            rt.forward(PROMPT, u)
        for k, v in full.adapter_state(u).items():
            torch.testing.assert_close(rt.adapter_state(u)[k], v, rtol=1e-12, atol=1e-12, msg=f"{u} {k}")
        assert rt.optimizer.step_count(rt.slot(u)) == full.optimizer.step_count(full.slot(u))


# ------------------------------------------------------------------------------------------------
# the pipeline's evaluation over more store users than slots: row_batches splits each batch so it
# names no more store users than the runtime can place


def test_row_batches_groups_rows_the_runtime_can_place(store_dir):
    root, _ = store_dir
    rows = ["u0", "u1", None, "u0", "u2", 3, None, "u1"]
    plain = MilpRuntime(tiny_model("llama"), max_users=2)
    assert list(plain.row_batches(rows, 3)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(plain.row_batches(rows, 8, order=[7, 6, 5, 4, 3, 2, 1, 0])) == [[7, 6, 5, 4, 3, 2, 1, 0]]
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root))
    groups = list(rt.row_batches(rows, 8))
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7]]
    for g in groups:  # each group is placed (two slots), in turn
        check_rows(rt, [rows[i] for i in g], store_dir[1])
    # a user added directly is never evicted: it takes a slot from every group, but its own rows are free
    pinned = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(root))
    pinned.add_user("p", MemoryConfig.uniform(2, 1, 4))
    assert list(pinned.row_batches(["p", "u0", "p", "u1", None, "u2"], 8)) == [[0, 1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        list(rt.row_batches(rows, 0))
    with pytest.raises(ValueError, match="order must be a permutation"):
        list(rt.row_batches(rows, 2, order=[0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(TypeError, match="users must be a sequence"):
        list(rt.row_batches("u0", 2))


def test_pipeline_evaluates_more_store_users_than_slots(tmp_path, tiny_tokenizer):
    from milp.data import Record
    from milp.pipeline import generate_responses, response_losses

    vocab = len(tiny_tokenizer)
    names = [f"user{i}" for i in range(5)]
    writer = MilpRuntime(tiny_model("llama", vocab_size=vocab), max_users=len(names))
    for i, u in enumerate(names):
        writer.add_user(u, MemoryConfig((True, True), (1 + i % 2, 1), (4, 8)), init="random", seed=i)
        writer.save_user(u, tmp_path / user_dirname(u))
    records = [Record(names[i % 5], "", [f"history {i}"], f"What about {i}?", f"Answer {i}.") for i in range(9)]
    full = MilpRuntime(tiny_model("llama", vocab_size=vocab), max_users=len(names))
    for u in names:
        full.load_user(tmp_path / user_dirname(u))
    rt = MilpRuntime(tiny_model("llama", vocab_size=vocab), max_users=2, store=UserStore(tmp_path))
    want = response_losses(full.model, tiny_tokenizer, records, runtime=full, batch_size=8)
    got = response_losses(rt.model, tiny_tokenizer, records, runtime=rt, batch_size=8)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    kw = dict(max_new_tokens=3, batch_size=8, progress=False)
    assert (generate_responses(rt.model, tiny_tokenizer, records, runtime=rt, **kw)
            == generate_responses(full.model, tiny_tokenizer, records, runtime=full, **kw))
    assert len(rt.users) <= 2 and rt.cache_info().evictions > 0


def _legacy_save(root, user, name=None):
    from milp.store import _dirname

    d = root / (name or _dirname(user, portable=False))
    d.mkdir()
    (d / "user.json").write_text(json.dumps({"user": user}))
    return d


def test_an_older_stores_case_sensitive_folders_get_their_current_names(tmp_path):
    """Folders an older version saved as users/Alice are renamed to user_dirname("Alice"); a
    folder under a name of the user's own choosing, one whose new name is taken, a crashed
    save's temp folder and a lower-case user stay; prediction files move by their rows' one user."""
    from milp.store import rename_legacy_folders

    _legacy_save(tmp_path, "Alice")
    _legacy_save(tmp_path, "alice")
    _legacy_save(tmp_path, "Bob", name="bobs-folder")  # a folder the user named: found by its user.json
    _legacy_save(tmp_path, "Carol")
    _legacy_save(tmp_path, "Carol", name=user_dirname("Carol"))  # saved again by this version
    _legacy_save(tmp_path, "Dave", name=".Dave.tmp-abc123")
    (tmp_path / "Eve").mkdir()  # no user.json: not a save
    assert rename_legacy_folders(tmp_path) == [("Alice", user_dirname("Alice"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [user_dirname("Alice"), "alice", "bobs-folder", "Carol", user_dirname("Carol"), ".Dave.tmp-abc123", "Eve"])
    assert rename_legacy_folders(tmp_path) == []  # idempotent
    assert UserStore(tmp_path).path("Alice").name == user_dirname("Alice")
    assert rename_legacy_folders(tmp_path / "missing") == []

    preds = tmp_path / "predictions"
    preds.mkdir()
    (preds / "Fay.json").write_text(json.dumps([{"user_id": "Fay", "prediction": "x"}] * 2))
    (preds / "Gus.json").write_text(json.dumps([{"user_id": "Gus"}, {"user_id": "Hal"}]))  # not one user's
    (preds / "Ida.json").write_text("[")  # damaged
    (preds / "Jo.json").write_text("[]")
    assert rename_legacy_folders(preds, ".json") == [("Fay.json", user_dirname("Fay") + ".json")]
    assert sorted(p.name for p in preds.iterdir()) == sorted(
        [user_dirname("Fay") + ".json", "Gus.json", "Ida.json", "Jo.json"])
    with pytest.raises(TypeError, match="suffix"):
        rename_legacy_folders(tmp_path, suffix=1)


def _age(path, seconds=60):
    """Set ``path``'s times ``seconds`` into the past (a folder nobody changed lately)."""
    import os
    import time

    t = time.time() - seconds
    os.utime(path, (t, t))


def _count_refreshes(monkeypatch) -> list[int]:
    """A list that gets a 1 at each full re-read of any UserStore's folder."""
    import milp.store

    reads: list[int] = []
    real = milp.store.UserStore.refresh
    monkeypatch.setattr(milp.store.UserStore, "refresh", lambda self: (reads.append(1), real(self))[1])
    return reads


def test_a_miss_rereads_the_store_only_where_it_changed(tmp_path, monkeypatch):
    """A client asking again and again for a user the store lacks (milp.serve's 404s) read every
    user.json on every miss; now one stat finds the folder unchanged. A user saved, deleted or
    copied in by hand since is still found (or not) on the next miss."""
    import shutil

    writer = MilpRuntime(tiny_model("llama"), max_users=3)
    for i, u in enumerate(["a", "b", "c"]):
        writer.add_user(u, MemoryConfig.uniform(2, 1, 4), init="random", seed=i)
    writer.save_user("a", tmp_path / "users" / "a")
    root = tmp_path / "users"
    (root / "notes").mkdir()  # a folder that is no user: checked on a miss, cheaply
    _age(root)
    reads = _count_refreshes(monkeypatch)
    store = UserStore(root)
    for _ in range(5):
        assert "nobody" not in store and store.path("nobody") is None
    assert reads == [1]
    writer.save_user("b", root / "bee")  # a save renames an entry into the folder (here not b's own name)
    assert "b" in store and len(reads) == 2
    _age(root)
    store.refresh()
    (root / "copy").mkdir()  # copied in by hand: the folder first, its files after
    _age(root)
    store.refresh()
    assert "c" not in store
    writer.save_user("c", tmp_path / "elsewhere")
    for p in (tmp_path / "elsewhere").iterdir():
        shutil.copy(p, root / "copy" / p.name)
    reads.clear()
    assert store.path("c") == root / "copy" and reads == []  # found without reading the others
    shutil.rmtree(root / "bee")  # a deletion moves the folder's time
    assert "b" not in store and len(reads) == 1
    assert sorted(store.users()) == ["a", "c"]


def test_a_folder_changed_within_its_time_resolution_is_read_again_on_every_miss(tmp_path, monkeypatch):
    """A folder whose time is within a coarse file system's resolution of now (FAT: 2 s) may change
    again without its time moving: its stamp proves nothing, and each miss re-reads it."""
    reads = _count_refreshes(monkeypatch)
    store = UserStore(tmp_path)  # just made: its time is now
    for _ in range(3):
        assert "nobody" not in store
    assert reads == [1, 1, 1]
