"""MemoryConfig: construction, validation, JSON round trip, parameter count."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milp.config import MAX_MODULES, MemoryConfig, atomic_directory


def test_uniform_and_layer_ranks():
    cfg = MemoryConfig.uniform(3, modules=2, rank=16, lora_alpha=32)
    assert cfg.layer_mask == (True, True, True)
    assert cfg.modules == (2, 2, 2)
    assert cfg.layer_ranks(1) == (16, 16)
    assert cfg.active_layers == (0, 1, 2)
    assert cfg.lora_alpha == 32.0


def test_per_module_ranks_and_inactive_layers():
    cfg = MemoryConfig((True, False, True), (2, 3, 0), ((8, 96), 8, 8))
    assert cfg.layer_ranks(0) == (8, 96)
    assert cfg.layer_ranks(1) == ()  # mask off
    assert cfg.layer_ranks(2) == ()  # zero modules
    assert cfg.active_layers == (0,)


def test_from_search_mapping_object_and_scalars():
    a = MemoryConfig.from_search({"layer_mask": [1, 0, 1], "modules": 2, "ranks": 32})
    assert a.modules == (2, 2, 2) and a.ranks == (32, 32, 32) and a.layer_mask == (True, False, True)
    b = MemoryConfig.from_search(SimpleNamespace(layer_mask=(True, True), modules=[1, 4], ranks=[8, [8, 16, 32, 64]]))
    assert b.layer_ranks(1) == (8, 16, 32, 64)
    with pytest.raises(ValueError, match="model has 4 layers"):
        MemoryConfig.from_search({"layer_mask": [1, 1], "modules": 1, "ranks": 8}, num_layers=4)
    with pytest.raises(KeyError, match="ranks"):
        MemoryConfig.from_search({"layer_mask": [1], "modules": 1})
    with pytest.raises(TypeError, match="layer_mask, modules and ranks"):
        MemoryConfig.from_search(object())


def test_from_search_accepts_tensors():
    torch = pytest.importorskip("torch")
    cfg = MemoryConfig.from_search({"layer_mask": torch.tensor([1, 0]), "modules": torch.tensor([3, 2]),
                                    "ranks": torch.tensor([8, 16])})
    assert cfg.layer_mask == (True, False) and cfg.modules == (3, 2) and cfg.ranks == (8, 16)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(layer_mask=(True,), modules=(MAX_MODULES + 1,), ranks=(8,)), ValueError,
         r"modules\[0\] must be in \[0, 32\]"),
        (dict(layer_mask=(True,), modules=(-1,), ranks=(8,)), ValueError, r"modules\[0\]"),
        (dict(layer_mask=(True,), modules=(1,), ranks=(0,)), ValueError, r"ranks\[0\] must be a positive int"),
        (dict(layer_mask=(True,), modules=(2,), ranks=((8, -4),)), ValueError, r"ranks\[0\]\[1\]"),
        (dict(layer_mask=(True,), modules=(2,), ranks=((8, 8, 8),)), ValueError, r"one rank per module"),
        (dict(layer_mask=(True, True), modules=(1,), ranks=(8, 8)), ValueError, r"modules has 1 entries"),
        (dict(layer_mask=(True, True), modules=(1, 1), ranks=(8,)), ValueError, r"ranks has 1 entries"),
        (dict(layer_mask=(), modules=(), ranks=()), ValueError, r"at least one layer"),
        (dict(layer_mask=(True,), modules=(1.5,), ranks=(8,)), TypeError, r"modules\[0\] must be an int"),
        (dict(layer_mask=(True,), modules=(1,), ranks=(8.0,)), TypeError, r"ranks\[0\]"),
        (dict(layer_mask=("yes",), modules=(1,), ranks=(8,)), TypeError, r"layer_mask\[0\]"),
        (dict(layer_mask=(True,), modules=(1,), ranks=(8,), lora_alpha=0), ValueError, r"lora_alpha"),
        (dict(layer_mask="1", modules=(1,), ranks=(8,)), TypeError, r"layer_mask must be a sequence"),
    ],
)
def test_bad_configs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MemoryConfig(**kwargs)


def test_any_positive_rank_allowed():
    assert MemoryConfig.uniform(1, 1, 1).layer_ranks(0) == (1,)
    assert MemoryConfig.uniform(1, 1, 512).layer_ranks(0) == (512,)


def test_check_num_layers():
    with pytest.raises(ValueError, match="has 2 layers but the model has 3"):
        MemoryConfig.uniform(2).check_num_layers(3)


def test_json_round_trip_text_and_file(tmp_path):
    cfg = MemoryConfig((True, False), (2, 1), ((8, 16), 32), lora_alpha=8.0)
    assert MemoryConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "sub" / "cfg.json"
    cfg.to_json(path)
    assert MemoryConfig.from_json(path) == cfg
    assert MemoryConfig.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["ranks"] == [[8, 16], 32]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MemoryConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="malformed"):
        MemoryConfig.from_json("{not json")
    with pytest.raises(ValueError, match="unknown keys"):
        MemoryConfig.from_dict({"layer_mask": [1], "modules": [1], "ranks": [8], "bogus": 1})
    with pytest.raises(ValueError, match="format"):
        MemoryConfig.from_dict({"format": "x", "layer_mask": [1], "modules": [1], "ranks": [8]})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, MAX_MODULES), st.integers(1, 96), st.booleans()),
                min_size=1, max_size=6),
       st.floats(0.5, 64))
def test_json_round_trip_property(layers, alpha):
    mask = tuple(m for m, _, _, _ in layers)
    modules = tuple(n for _, n, _, _ in layers)
    ranks = tuple(tuple(r + j for j in range(n)) if per and n else r for _, n, r, per in layers)
    cfg = MemoryConfig(mask, modules, ranks, alpha)
    again = MemoryConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert all(len(cfg.layer_ranks(li)) == (n if m else 0) for li, (m, n, _, _) in enumerate(layers))


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    d = tmp_path / "out"
    with atomic_directory(d) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(d) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in d.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_directory(d) as tmp:
            (tmp / "c").write_text("3")
            raise RuntimeError("boom")
    assert sorted(p.name for p in d.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_atomic_directory_leaves_no_folders_it_made(tmp_path):
    """A failed first write into a new nested path takes back the parents it created, not
    the ones that were there, nor one that another writer filled meanwhile."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "kept" / "a" / "b" / "user") as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("boom")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["kept"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "kept" / "a" / "b" / "user"):
            (tmp_path / "kept" / "a" / "other").write_text("meanwhile")
            raise RuntimeError("boom")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "kept", "kept/a", "kept/a/other"]


def test_num_parameters_matches_banks_and_formula():
    pytest.importorskip("search.space", reason="search.space.parameter_count (the search package) is not there yet")
    from milp.inject import tiny_model
    from milp.runtime import MilpRuntime

    model = tiny_model("llama", num_hidden_layers=3)
    cfg = MemoryConfig((True, False, True), (2, 4, 1), ((8, 16), 8, 32))
    # LLaMA targets: gate/up (32 -> 64) and down (64 -> 32): every rank row costs 96 parameters
    expected = (8 + 16 + 32) * 3 * (32 + 64)
    assert cfg.num_parameters(model) == expected
    assert cfg.num_parameters([[(32, 64), (32, 64), (64, 32)]] * 3) == expected
    rt = MilpRuntime(model, max_users=1)
    rt.add_user("u", cfg)
    assert rt.num_parameters("u") == expected
    with pytest.raises(ValueError, match="has 3 layers but the model has 2"):
        cfg.num_parameters(tiny_model("gpt2"))


def test_atomic_writes_give_ordinary_modes(tmp_path):
    """Temporary files and folders are private (0o600/0o700); what they become is not: a new file
    gets 0o644 and a folder 0o755 (the project's convention: search.trial_log, the model cache), a
    replaced file keeps its own."""
    from milp.config import atomic_directory, atomic_write_text
    from milp.data import Record, write_jsonl

    old = os.umask(0o022)
    try:
        kept = tmp_path / "kept.jsonl"
        kept.write_text("")
        kept.chmod(0o664)
        rec = Record("u", "p", ("h",), "q", "r")
        write_jsonl([rec], tmp_path / "new.jsonl")
        write_jsonl([rec], kept)
        atomic_write_text(tmp_path / "new.json", "{}")
        with atomic_directory(tmp_path / "user") as d:
            (d / "a.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert [mode(p) for p in ("new.jsonl", "kept.jsonl", "new.json", "user")] == [0o644, 0o664, 0o644, 0o755]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "new.json", "new.jsonl", "user"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced fds through /proc (Linux)")
def test_atomic_writes_sync_files_and_folders_before_and_after_the_rename(tmp_path, monkeypatch):
    """Durable, not only atomic: the files a directory holds are synced before the rename that
    publishes it, and the parent folder after it (else a power loss may bring back the old entry)."""
    import search.trial_log as tl
    from milp.config import atomic_directory, atomic_write_text

    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(f"replace {b}"), real_replace(a, b)))
    with atomic_directory(tmp_path / "user") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"x")
        (tmp / "b.json").write_text("{}")
    rename = synced.index(f"replace {tmp_path / 'user'}")
    before = {os.path.relpath(p, tmp) for p in synced[:rename]}
    assert {"sub/a.bin", "b.json", "sub", "."} <= before
    assert str(tmp_path) in synced[rename + 1:]
    synced.clear()
    atomic_write_text(tmp_path / "r.json", "{}")
    assert synced[-2:] == [f"replace {tmp_path / 'r.json'}", str(tmp_path)]
    assert tl.fsync_dir(tmp_path / "missing") is None  # nothing to sync: no error


def test_an_interrupt_after_the_swap_leaves_no_previous_folder_behind(tmp_path, monkeypatch):
    """A Ctrl-C (or any exception) in the parent folder's fsync after the rename: the new
    folder is published by then, and the previous one (swapped into the temporary name) used to
    stay behind as ``.NAME.tmp-*`` for good; it is removed, and the interrupt still propagates.
    (``fsync_dir`` itself swallows ``OSError``.)"""
    import search.trial_log

    d = tmp_path / "user"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("old")
    real = search.trial_log.fsync_dir

    def interrupted(path):
        if Path(path) == tmp_path:  # the parent's fsync, after the rename
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(search.trial_log, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(d) as tmp:
            (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]
    assert (d / "a.txt").read_text() == "new"
