"""Property tests of per-user storage (milp.store with MilpRuntime.save_user/load_user and
milp.config.atomic_directory): directory names are safe and collision-free for any ids; a store
of drawn users lists and finds exactly them; adapters round-trip bit for bit in every dtype; a
save failing at any point leaves the previous save (or nothing) and no debris; a corrupted or
mismatched user is refused without leaving a half-loaded user behind."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from milp.config import MemoryConfig, atomic_directory
from milp.inject import remove_milp, tiny_model
from milp.runtime import MilpRuntime
from milp.store import UserStore, user_dirname

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

ids = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab.-_/7", max_size=6),
    st.text(alphabet="aAbB-7", max_size=4),  # ids differing only in case
    st.integers(-(10**12), 10**12),
    st.sampled_from(["", ".", "..", "a/b", "7", "-", "_", "x" * 100, "a_b-3ec69c85", "7-11b89f5c", "_-da39a3ee",
                     "Alice", "alice", "ALICE", "alice-35318264", "Alice-35318264"]),
)


def key(u):
    return (type(u).__name__, u)


@st.composite
def id_sets(draw, max_size: int = 6):
    """Distinct ids (``7`` and ``"7"`` are two), plus the names other ids get, as ids themselves."""
    base = draw(st.lists(ids, min_size=1, max_size=max_size, unique_by=key))
    if draw(st.booleans()):
        base += [user_dirname(u) for u in base[:2]]
    out = {key(u): u for u in base}
    return list(out.values())


@given(users=id_sets(max_size=12))
@settings(max_examples=300, deadline=None)
def test_dirnames_are_safe_stable_and_collision_free(users):
    """Also where the file system ignores case (macOS, Windows): "Alice" and "alice" shared one
    folder there, and milp.train skipped the second user as already saved."""
    names = [user_dirname(u) for u in users]
    for u, name in zip(users, names):
        assert SAFE_NAME.fullmatch(name) and name not in (".", "..") and len(name) <= 89, (u, name)
        assert user_dirname(u) == name
    assert len({n.lower() for n in names}) == len(names), dict(zip(map(repr, users), names))


def fake_save(root: Path, store: UserStore, u, payload: str) -> None:
    """What MilpRuntime.save_user does to the store's folder, without a model: an atomic
    directory with the user's user.json (and a payload file) at ``store.save_path(u)``."""
    with atomic_directory(store.save_path(u)) as tmp:
        (tmp / "user.json").write_text(json.dumps({"user": u}))
        (tmp / "payload").write_text(payload)


@given(users=id_sets())
@settings(max_examples=60, deadline=None)
def test_a_store_lists_and_finds_exactly_its_users(users):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "users"
        root.mkdir()
        store = UserStore(root)
        for i, u in enumerate(users):
            fake_save(root, store, u, f"#{i}")
        assert root.is_dir()
        assert sorted(map(key, store.users())) == sorted(map(key, users))
        fresh = UserStore(root)
        for i, u in enumerate(users):
            for s in (store, fresh):
                assert u in s
                assert (s.path(u) / "payload").read_text() == f"#{i}"
                assert s.path(u).parent == root
        saved = {key(u) for u in users}
        for u in users:  # an id equal to a saved one in value but not in type is not that user
            for other in ([str(u), True if u == 1 else None, float(u) if abs(u) < 2**53 else None]
                          if isinstance(u, int) else [int(u) if re.fullmatch(r"-?[0-9]{1,12}", u) else None]):
                if other is not None and key(other) not in saved:
                    assert other not in fresh, (u, other)
        # a second save of each user replaces its directory, nobody else's
        for i, u in enumerate(users):
            fake_save(root, store, u, f"second #{i}")
        assert sorted(map(key, UserStore(root).users())) == sorted(map(key, users))
        assert all((fresh.path(u) / "payload").read_text() == f"second #{i}" for i, u in enumerate(users))
        assert sorted(p.name for p in root.iterdir()) == sorted(fresh.path(u).name for u in users)  # nothing else


def test_regression_the_empty_id_is_not_the_store_itself(tmp_path):
    """user_dirname("") was "" and saving user "" replaced the whole store with its folder."""
    store = UserStore(tmp_path)
    fake_save(tmp_path, store, "a", "a")
    fake_save(tmp_path, store, "", "empty")
    assert sorted(store.users()) == ["", "a"]
    assert store.path("") != tmp_path and (store.path("a") / "payload").read_text() == "a"


def test_regression_lookalike_ids_do_not_share_a_directory(tmp_path):
    store = UserStore(tmp_path)
    for u in ["a/b", "a_b-3ec69c85", 7, "7-11b89f5c"]:
        fake_save(tmp_path, store, u, repr(u))
    assert all((store.path(u) / "payload").read_text() == repr(u) for u in ["a/b", "a_b-3ec69c85", 7, "7-11b89f5c"])


def test_regression_bool_and_float_ids_are_not_int_users(tmp_path):
    store = UserStore(tmp_path)
    fake_save(tmp_path, store, 1, "one")
    assert 1 in store and True not in store and 1.0 not in store and store.path(True) is None


def test_regression_a_crashed_save_is_not_a_user(tmp_path):
    """A writer killed inside atomic_directory leaves ``.NAME.tmp-XXXXXXXX`` (user.json and
    all): not a saved user, and it does not shadow the user's real directory."""
    store = UserStore(tmp_path)
    fake_save(tmp_path, store, "late", "real")
    os.replace(tmp_path / "late", tmp_path / "elsewhere")  # saved under another name
    for name, u in ((".ghost.tmp-abcd1234", "ghost"), (".elsewhere.tmp-x1y2z3_4", "late")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "user.json").write_text(json.dumps({"user": u}))
    assert store.users() == ["late"] and "ghost" not in store
    assert store.path("late") == tmp_path / "elsewhere"


# --------------------------------------------------------------------- real saves of adapters
_MODELS: dict[torch.dtype, torch.nn.Module] = {}


def runtime(dtype: torch.dtype, max_users: int = 3, store: UserStore | None = None) -> MilpRuntime:
    """A runtime on a cached tiny LLaMA of ``dtype`` (handed back by ``release``)."""
    if dtype not in _MODELS:
        _MODELS[dtype] = tiny_model("llama").to(dtype)
    return MilpRuntime(_MODELS[dtype], max_users=max_users, store=store)


def release(*rts: MilpRuntime) -> None:
    for rt in rts:
        remove_milp(rt.model)


@st.composite
def small_configs(draw):
    mods = [draw(st.integers(0, 3)) for _ in range(2)]
    mask = [draw(st.booleans()) for _ in range(2)]
    if not any(m and n for m, n in zip(mask, mods)):
        mask[0], mods[0] = True, max(mods[0], 1)  # at least one active layer
    ranks = [draw(st.one_of(st.integers(1, 12), st.lists(st.integers(1, 12), min_size=n, max_size=n).map(tuple)))
             if n else 8 for n in mods]
    return MemoryConfig(tuple(mask), tuple(mods), tuple(ranks), draw(st.sampled_from([4.0, 16.0])))


def trained_user(rt: MilpRuntime, u, cfg: MemoryConfig, seed: int, steps: int) -> None:
    rt.add_user(u, cfg, init="random", seed=seed, total_steps=10)
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        rt.train_step(ids, u)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@settings(SETTINGS, max_examples=8)
@given(dtype=st.sampled_from(DTYPES), cfgs=st.lists(small_configs(), min_size=1, max_size=3),
       steps=st.integers(0, 1), user_ids=st.lists(st.sampled_from(["u", 7, "a/b", "", "7"]), min_size=3, max_size=3,
                                                  unique_by=key))
def test_adapters_round_trip_bit_for_bit_in_every_dtype(dtype, cfgs, steps, user_ids):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        store = UserStore(root)
        writer = runtime(dtype)
        try:
            want = {}
            for i, (u, cfg) in enumerate(zip(user_ids, cfgs)):
                trained_user(writer, u, cfg, i, steps)
                writer.save_user(u, store.save_path(u))
                opt = {k: v.clone() for k, v in writer.optimizer.user_state(writer.slot(u)).items()}
                want[key(u)] = (writer.adapter_state(u), opt, cfg)
        finally:
            release(writer)
        assert sorted(map(key, store.users())) == sorted(want)
        reader = runtime(dtype, max_users=1, store=UserStore(root))
        try:
            for u in store.users():  # loaded (and evicted) by the store, one slot for all
                with torch.no_grad():
                    reader.forward(torch.ones(1, 3, dtype=torch.long), [u])
                adapters, opt, cfg = want[key(u)]
                got = reader.adapter_state(u)
                assert reader.config(u) == cfg and got.keys() == adapters.keys()
                for k, v in adapters.items():
                    assert got[k].dtype == dtype and torch.equal(got[k], v), (u, k)
                got_opt = reader.optimizer.user_state(reader.slot(u))
                assert got_opt.keys() == opt.keys()
                assert all(torch.equal(got_opt[k], v) for k, v in opt.items())
        finally:
            release(reader)


class Crash(Exception):
    pass


@SETTINGS
@given(fail_at=st.integers(0, 18), existed=st.booleans(), cfg=small_configs())
@example(fail_at=16, existed=True, cfg=MemoryConfig((True, False), (1, 0), (1, 8), lora_alpha=4.0))  # last step
@example(fail_at=17, existed=False, cfg=MemoryConfig((True, False), (1, 0), (1, 8), lora_alpha=4.0))
def test_a_save_failing_anywhere_keeps_the_previous_save(fail_at, existed, cfg):
    """Every file-system step of save_user (temporary folders, each file written, each rename)
    may fail: the user's folder then holds the previous save byte for byte (or does not exist),
    the store's folder holds nothing else, and the store still loads the previous adapters.
    The one exception is the last step, the fsync of the store's folder after the new save was
    renamed into place (only an interrupt gets through it: fsync_dir ignores OSError): the new
    save is published by then, whole, and stays, while the interrupt propagates."""
    import pathlib

    import safetensors.torch

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        store = UserStore(root)
        rt = runtime(torch.float32)
        try:
            trained_user(rt, "u", cfg, 0, 0)
            rt.add_user("other", MemoryConfig.uniform(2, 1, 4))
            rt.save_user("other", store.save_path("other"))
            before = old = None
            if existed:
                rt.save_user("u", store.save_path("u"))
                before, old = files(root / "u"), rt.adapter_state("u")
            rt.train_step(torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(1)), "u")
            new = rt.adapter_state("u")  # the new save differs from the old one
            calls = [0]

            def failing(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == fail_at + 1:
                        raise Crash(f"step {fail_at} fails")
                    return real(*args, **kwargs)
                return call

            def patched_save(directory, fail):
                calls[0] = 0 if fail else -(1 << 30)  # a dry run counts the steps and fails none
                with pytest.MonkeyPatch.context() as mp:
                    for obj, name in [(safetensors.torch, "save_file"), (os, "replace"), (os, "fsync"),
                                      (os, "chmod"), (pathlib.Path, "write_text"), (pathlib.Path, "write_bytes"),
                                      (tempfile, "mkdtemp"), (tempfile, "mkstemp")]:
                        mp.setattr(obj, name, failing(getattr(obj, name)))
                    rt.save_user("u", directory)
                return calls[0] + (1 << 30)

            with tempfile.TemporaryDirectory() as scratch:  # the same save, counted (last step: the fsync)
                if existed:
                    rt.save_user("u", Path(scratch) / "u")
                steps = patched_save(Path(scratch) / "u", fail=False)
                published = files(Path(scratch) / "u")
            failed = False
            try:
                patched_save(store.save_path("u"), fail=True)
            except Crash:
                failed = True
        finally:
            release(rt)
        assert failed == (fail_at < steps)
        after_publish = failed and fail_at == steps - 1
        kept = existed or not failed or after_publish
        assert sorted(p.name for p in root.iterdir()) == (["other", "u"] if kept else ["other"])
        if after_publish:
            assert files(root / "u") == published
        elif failed and existed:
            assert files(root / "u") == before
        reader = runtime(torch.float32, store=UserStore(root))
        try:
            assert ("u" in reader.store) == kept
            if kept:
                with torch.no_grad():
                    reader.forward(torch.ones(1, 3, dtype=torch.long), ["u"])
                want = old if failed and not after_publish else new
                assert all(torch.equal(reader.adapter_state("u")[k], v) for k, v in want.items())
        finally:
            release(reader)


CORRUPTIONS = ["truncate adapters", "truncate optimizer", "truncate user.json", "truncate memory_config",
               "delete adapters", "delete memory_config", "delete user.json", "other ranks", "other shapes",
               "int adapters", "nan adapters", "extra tensor", "missing tensor", "user.json list", "no user key"]


@SETTINGS
@given(corruption=st.sampled_from(CORRUPTIONS), cfg=small_configs(), data=st.data())
def test_a_corrupted_or_mismatched_user_is_refused_whole(corruption, cfg, data):
    """load_user (directly, or through the store in a batch) refuses the user with an error
    and leaves the runtime as it was: no half-loaded user, the other users' outputs unchanged."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rt = runtime(torch.float32, max_users=3, store=UserStore(root))
        try:
            trained_user(rt, "u", cfg, 0, 1)
            rt.save_user("u", root / "u")
            rt.remove_user("u")
            rt.add_user("keep", MemoryConfig.uniform(2, 1, 4), init="random", seed=3)
            ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = rt.forward(ids, ["keep"]).logits
            u = root / "u"
            what, _, name = corruption.partition(" ")
            target = {"adapters": "adapters.safetensors", "optimizer": "optimizer.safetensors",
                      "user.json": "user.json", "memory_config": "memory_config.json"}.get(name)
            if what == "truncate":
                raw = (u / target).read_bytes()
                n = data.draw(st.integers(0, len(raw) - (2 if target.endswith(".json") else 1)))
                (u / target).write_bytes(raw[:n])
            elif what == "delete":
                (u / target).unlink()
            elif corruption == "other ranks":
                li = cfg.active_layers[0]
                ranks = list(cfg.ranks)
                ranks[li] = tuple(r + 1 for r in cfg.layer_ranks(li))
                modules = list(cfg.modules)
                modules[li] = len(ranks[li])
                other = MemoryConfig(cfg.layer_mask, tuple(modules), tuple(ranks), cfg.lora_alpha)
                other.to_json(u / "memory_config.json")
            elif corruption == "other shapes":
                info = json.loads((u / "user.json").read_text())
                info["target_shapes"][0][0] = [32, 65]
                (u / "user.json").write_text(json.dumps(info))
            elif corruption in ("user.json list", "no user key"):
                info = json.loads((u / "user.json").read_text())
                info.pop("user")
                (u / "user.json").write_text(json.dumps(info if corruption == "no user key" else [info]))
            else:
                t = load_file(str(u / "adapters.safetensors"))
                k = data.draw(st.sampled_from(sorted(t)))
                if corruption == "int adapters":
                    t[k] = t[k].to(torch.int32)
                elif corruption == "nan adapters":
                    t[k][0, 0] = float("nan")
                elif corruption == "extra tensor":
                    t["layers.9.mlp.up_proj.lora_A"] = t[k].clone()
                else:
                    del t[k]
                save_file(t, str(u / "adapters.safetensors"))
            with pytest.raises(Exception) as excinfo:  # noqa: B017 - any clear error
                rt.load_user(u, None if corruption in ("no user key", "user.json list") else "u")
            assert str(excinfo.value), repr(excinfo.value)
            assert rt.users == ["keep"] and rt.state.users() == [rt.slot("keep")]
            with pytest.raises(Exception):  # noqa: B017 - the same user, named in a batch: the store loads it
                rt.forward(ids.repeat(2, 1), ["keep", "u"])
            assert rt.users == ["keep"] and rt.state.users() == [rt.slot("keep")]
            with torch.no_grad():
                assert torch.equal(rt.forward(ids, ["keep"]).logits, ref)
        finally:
            release(rt)
