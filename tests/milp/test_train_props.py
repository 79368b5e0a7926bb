"""Property and edge-case tests of the ``python -m milp.train`` command line (its argument
parsers, data loading and user sampling, the output directory and the resumption check, the
device) and of milp.models (dtype names, the default model's cache, the sentence embedder).

Each "Was:" names what a test caught before its fix. Nothing here trains a model: a run that
refuses its input stops before the first step, and the rest calls the helpers directly."""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import milp.models as mm
import milp.train as train
from milp.config import MAX_MODULES
from milp.data import Record, group_by_user

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ws = st.sampled_from(["", " ", "  ", "\t"])  # whitespace the parsers must ignore


def parse(*argv: str) -> argparse.Namespace:
    return train.build_parser().parse_args(list(argv))


def refused(capsys, *argv: str) -> str:
    """The argparse error of ``argv`` (exit status 2), as printed."""
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- _int_list (--search-ranks)
@SETTINGS
@given(vals=st.lists(st.integers(1, 10**6), min_size=1, max_size=6, unique=True), pad=ws)
def test_int_list_round_trips_distinct_positive_ints(vals, pad):
    text = ",".join(f"{pad}{v}{pad}" for v in vals)
    assert train._int_list(text) == tuple(vals)


@SETTINGS
@given(vals=st.lists(st.integers(1, 512), min_size=1, max_size=5), dup=st.data())
def test_int_list_refuses_repeated_values(vals, dup):
    """Was: ``--search-ranks 8,8`` was accepted, written to run.json, and the run failed after
    loading the model with the search space's "ranks must not contain duplicates", which does
    not name the flag; the corrected command was then refused as a resumption with other
    settings."""
    text = ",".join(map(str, vals + [dup.draw(st.sampled_from(vals))]))
    with pytest.raises(argparse.ArgumentTypeError, match="repeat"):
        train._int_list(text)


@pytest.mark.parametrize("text", ["", ",", " , ", "8,0", "8,-1", "8,x", "1.5", "8;16"])
def test_int_list_refuses_non_positive_or_malformed(text):
    with pytest.raises(argparse.ArgumentTypeError):
        train._int_list(text)


def test_search_ranks_flag_names_itself_when_refused(capsys):
    assert "argument --search-ranks" in refused(capsys, "--search-ranks", "16,8,16")


# --------------------------------------------------------------------------- _int_range (--search-modules)
@SETTINGS
@given(lo=st.integers(0, MAX_MODULES), hi=st.integers(1, MAX_MODULES), a=ws, b=ws, c=ws)
def test_int_range_round_trips_and_refuses_inverted(lo, hi, a, b, c):
    text = f"{a}{lo}{b}-{c}{hi}{a}"
    if lo <= hi:
        assert train._int_range(text) == (lo, hi)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="inverted"):
            train._int_range(text)


@SETTINGS
@given(n=st.integers(1, MAX_MODULES))
def test_int_range_single_number_is_a_fixed_count(n):
    assert train._int_range(str(n)) == (n, n)


@pytest.mark.parametrize("text", ["0", "0-0", " 0 - 0 "])
def test_int_range_without_any_module_is_refused(text):
    """Was: ``--search-modules 0-0`` was accepted: every configuration of the search had no
    memory, and the pick rule never picks one, so the whole search was spent for nothing."""
    with pytest.raises(argparse.ArgumentTypeError, match="HI >= 1"):
        train._int_range(text)


@pytest.mark.parametrize("text", ["", "-", "-3", "3-", "1-2-3", "a-b", f"0-{MAX_MODULES + 1}", f"{MAX_MODULES + 1}"])
def test_int_range_refuses_malformed_or_too_large(text):
    with pytest.raises(argparse.ArgumentTypeError):
        train._int_range(text)


# --------------------------------------------------------------------------- _name_list (--search-dims)
@SETTINGS
@given(names=st.lists(st.sampled_from(train.SEARCH_DIMS), min_size=1, max_size=3, unique=True),
       upper=st.lists(st.booleans(), min_size=3, max_size=3), pad=ws)
def test_name_list_any_order_and_case_gives_choices_order(names, upper, pad):
    text = ",".join(f"{pad}{n.upper() if u else n}{pad}" for n, u in zip(names, upper))
    assert train._dims_list(text) == tuple(d for d in train.SEARCH_DIMS if d in names)
    assert train._dims_list(f"{pad}ALL{pad}") == train.SEARCH_DIMS


@pytest.mark.parametrize("text, match", [("", "unknown"), (" , ", "unknown"), ("size,size", "repeat"),
                                         ("size,depth", "depth"), ("all,size", "all")])
def test_name_list_refuses_empty_repeated_or_unknown(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        train._dims_list(text)


# --------------------------------------------------------------------------- numeric flags and their --help
def test_help_shows_each_default_as_it_would_be_typed():
    """Was: ``--help`` said "--no-progress ... (default: True)" (read as if bars were off by
    default), "(default: embedded SmolLM2-135M-Instruct) (default: None)" and showed sequences as
    Python tuples ("(default: (0, 32))"); ``milp.evaluate --help`` the same. Every default shown
    must parse back to the flag's default."""
    import milp.evaluate as ev

    checked = 0
    for parser in (train.build_parser(), ev.build_parser()):
        text = " ".join(parser.format_help().split())
        assert not re.search(r"\(default: (None|True|False|\(|\[)", text), text
        assert text.count("(default:") == len(re.findall(r"\(default: [^)]*\)", text))
        for action in parser._actions:
            m = re.search(r"\(default: ([^)]*)\)$", " ".join((parser._get_formatter()._expand_help(action)
                                                            if action.help else "").split()))
            if m and action.type is not None and callable(action.type) and action.option_strings:
                shown = m.group(1)
                if not shown.startswith(("embedded", "the ", "half", "bars")):
                    assert action.type(shown) == action.default, (action.option_strings, shown)
                    checked += 1
    assert checked > 40  # both parsers' typed flags, the sequences included
    text = " ".join(train.build_parser().format_help().split())
    assert f"(default: 0-{MAX_MODULES})" in text and "(default: bars on)" in text


@SETTINGS
@given(n=st.integers(-5, MAX_MODULES + 5))
def test_modules_flag_accepts_exactly_the_range_its_help_states(n, capsys):
    """Was: ``--modules 33`` (help: "0..32") was accepted and refused only after run.json and
    split.json were written and the model was loaded; the corrected command was then refused
    as a resumption with other settings."""
    assert f"(0..{MAX_MODULES})" in train.build_parser().format_help().replace("\n", " ")
    if 0 <= n <= MAX_MODULES:
        assert parse("--modules", str(n)).modules == n
    else:
        assert "argument --modules" in refused(capsys, "--modules", str(n))


@pytest.mark.parametrize("seed, ok", [(0, True), (2**62 - 1, True), (2**62, False), (2**64, False), (-1, False)])
def test_seed_flag_is_bounded_by_what_the_seeded_generators_take(seed, ok, capsys):
    """Was: ``--seed 18446744073709551616`` was accepted and ``torch.manual_seed`` failed with
    "Overflow when unpacking long long" (not naming --seed); the search refuses seeds >= 2**62."""
    if ok:
        assert parse("--seed", str(seed)).seed == seed
    else:
        assert "argument --seed" in refused(capsys, "--seed", str(seed))


@pytest.mark.parametrize("flag", ["--lora-alpha", "--memory-lr", "--instruct-lr", "--search-tolerance"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-1", "x", ""])
def test_float_flags_refuse_non_finite_negative_or_malformed(flag, value, capsys):
    assert f"argument {flag}" in refused(capsys, flag, value)


@pytest.mark.parametrize("flag, minimum", [("--users", 0), ("--rank", 1), ("--memory-steps", 1), ("--max-length", 8),
                                           ("--instruct-steps", 0), ("--batch-size", 1), ("--slots", 1),
                                           ("--search", 0), ("--search-q", 1), ("--search-init", 1)])
def test_int_flags_accept_their_minimum_and_refuse_below_it(flag, minimum, capsys):
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(parse(flag, f" {minimum} "), dest) == minimum
    assert f"argument {flag}" in refused(capsys, flag, str(minimum - 1))
    assert f"argument {flag}" in refused(capsys, flag, f"{minimum}.5")


#: a value other than the default for each flag the search reads or overrides
_OTHER = {"search_q": ["--search-q", "2"], "search_init": ["--search-init", "3"],
          "search_surrogate": ["--search-surrogate", "gp"], "search_nuts": ["--search-nuts", "fast"],
          "search_modules": ["--search-modules", "1-4"], "search_ranks": ["--search-ranks", "8,16"],
          "search_space": ["--search-space", "extended"], "search_tolerance": ["--search-tolerance", "0.1"],
          "layers": ["--layers", "0"], "modules": ["--modules", "3"], "rank": ["--rank", "4"]}
_DIMS = ("layers", "num", "size")


def _has_effect(flag: str, search: int, dims: tuple[str, ...]) -> bool:
    """Whether ``flag`` changes the run, read off what ``train._search`` and ``_default_config`` use."""
    if not search:
        return flag in ("layers", "modules", "rank")
    return {"layers": False, "modules": "num" not in dims, "rank": "size" not in dims,
            "search_modules": "num" in dims, "search_ranks": "size" in dims}.get(flag, True)


@settings(SETTINGS, max_examples=150)
@given(flags=st.sets(st.sampled_from(sorted(_OTHER))), search=st.sampled_from([0, 4]),
       dims=st.sets(st.sampled_from(_DIMS), min_size=1))
def test_a_flag_that_would_change_nothing_is_refused_by_name(flags, search, dims, capsys):
    """Was: ``--search-ranks 8,16`` without ``--search``, ``--rank 4`` with the rank searched,
    or ``--layers 0`` with any search ran as if they were not given, silently."""
    dims = tuple(d for d in _DIMS if d in dims)
    argv = [a for f in sorted(flags) for a in _OTHER[f]] + ["--search", str(search), "--search-dims", ",".join(dims)]
    if not search and dims != _DIMS:
        flags = flags | {"search_dims"}
    ignored = [f for f in flags if not _has_effect(f, search, dims)]
    parser = train.build_parser()
    said = train._ignored_flags(parser.parse_args(argv), parser)
    assert len(said) == len(ignored)
    for f in ignored:
        assert any(m.startswith("--" + f.replace("_", "-") + " has no effect") for m in said), (f, said)
    if ignored:
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--output", "/nonexistent/never-written"])
        assert e.value.code == 2 and "has no effect" in capsys.readouterr().err


def test_defaults_parse_back_to_themselves():
    """Every default is a value its own parser accepts (a resumption compares parsed settings)."""
    args = parse()
    assert train._int_range(f"{args.search_modules[0]}-{args.search_modules[1]}") == args.search_modules
    assert train._int_list(",".join(map(str, args.search_ranks))) == args.search_ranks
    assert train._dims_list(",".join(args.search_dims)) == args.search_dims


# --------------------------------------------------------------------------- _parse_layers (--layers)
@st.composite
def layer_masks(draw):
    n = draw(st.integers(1, 40))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    return n, tuple(mask)


def mask_text(draw, mask):
    """A --layers text for ``mask``: its runs as ``LO-HI`` or single layers, shuffled, padded."""
    parts, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j + 1 < len(mask) and mask[j + 1]:
                j += 1
            split = draw(st.booleans())
            parts += [str(k) for k in range(i, j + 1)] if split else [f"{i}-{j}" if j > i else str(i)]
            i = j + 1
        else:
            i += 1
    parts = draw(st.permutations(parts))
    return ",".join(f"{draw(ws)}{p}{draw(ws)}" for p in parts)


@SETTINGS
@given(nm=layer_masks(), data=st.data())
def test_parse_layers_round_trips_any_mask(nm, data):
    n, mask = nm
    assert train._parse_layers(mask_text(data.draw, mask), n) == mask
    assert train._parse_layers(" all ", n) == (True,) * n


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_parse_layers_refuses_an_empty_list(text):
    """Was: ``--layers ""`` (or ``,``) gave a mask with no layer: every user trained without
    any memory adapter, silently."""
    with pytest.raises(ValueError, match="--layers: expected"):
        train._parse_layers(text, 4)


@SETTINGS
@given(lo=st.integers(1, 30), d=st.integers(1, 5))
def test_parse_layers_says_inverted_for_an_inverted_range(lo, d):
    """Was: "out of range for a model with 40 layers" for ``5-2`` on a 40-layer model."""
    with pytest.raises(ValueError, match="inverted"):
        train._parse_layers(f"{lo + d}-{lo}", 40)


@SETTINGS
@given(n=st.integers(1, 40), extra=st.integers(0, 5))
def test_parse_layers_refuses_a_layer_the_model_lacks(n, extra):
    with pytest.raises(ValueError, match=f"out of range for a model with {n} layers"):
        train._parse_layers(f"0,{n + extra}", n)


@pytest.mark.parametrize("text", ["ALL", "0;1", "1-", "-1", "a", "1 - 2", "0,1x"])
def test_parse_layers_refuses_malformed(text):
    with pytest.raises(ValueError, match="--layers"):
        train._parse_layers(text, 4)


# --------------------------------------------------------------------------- load_records, select_users
def test_load_records_refuses_a_directory_for_one_file_formats(tmp_path):
    """Was: ``--data DIR`` (jsonl, amazonqa, reddit, lamp) raised IsADirectoryError, which
    ``main`` does not report: a traceback. (MedDia reads a folder of dialogues.)"""
    for fmt in ("auto", "jsonl", "amazonqa", "reddit", "lamp"):
        with pytest.raises(ValueError, match=r"--data: .* is a directory"):
            train.load_records(str(tmp_path), fmt)
    with pytest.raises(FileNotFoundError, match="dialogue"):
        train.load_records(str(tmp_path), "meddia")


def test_load_records_bad_paths_and_formats(tmp_path):
    with pytest.raises(ValueError, match="--data: expected a file path"):
        train.load_records("", "jsonl")  # was: read "." as a file
    with pytest.raises(FileNotFoundError, match="--data.*does not exist"):
        train.load_records(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="--data-format jsonl needs --data"):
        train.load_records(None, "jsonl")
    with pytest.raises(ValueError, match="unknown format 'JSONL'"):  # was: "--data-format JSONL needs --data"
        train.load_records(None, "JSONL")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable records"):
        train.load_records(str(tmp_path / "empty.jsonl"))


@st.composite
def user_records(draw):
    n_users = draw(st.integers(1, 12))
    counts = draw(st.lists(st.integers(1, 3), min_size=n_users, max_size=n_users))
    recs = [Record(f"u{u}", "", [f"h{u}"], f"q{u} {k}", "r") for u, c in enumerate(counts) for k in range(c)]
    return draw(st.permutations(recs))


@SETTINGS
@given(recs=user_records(), n=st.integers(0, 15), seed=st.integers(0, 2**40))
def test_select_users_keeps_whole_users_in_order(recs, n, seed):
    got = train.select_users(recs, n, seed)
    users = group_by_user(recs)
    kept = group_by_user(got)
    assert len(kept) == (len(users) if n == 0 else min(n, len(users)))
    assert [r for r in recs if r.user_id in kept] == got  # every record of a kept user, in data order
    assert train.select_users(recs, n, seed) == got
    assert train.select_users(list(reversed(recs)), n, seed) == list(reversed(got))  # by user id, not order


@pytest.mark.parametrize("n", [-1, True, 1.5, "3", None])
def test_select_users_refuses_a_bad_count(n):
    """Was: ``n=-1`` raised random's "Sample larger than population or is negative";
    ``n=True`` drew one user."""
    recs = [Record(f"u{i}", "", ["h"], "q", "r") for i in range(5)]
    with pytest.raises(ValueError, match="n \\(--users\\) must be an int >= 0"):
        train.select_users(recs, n, 0)


# --------------------------------------------------------------------------- refused runs leave nothing
def _fast(out: Path, *extra: str) -> list[str]:
    return ["--output", str(out), "--no-progress", "--users", "7", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--users", "2"], "at least 3 users"),
    (["--layers", "0,5"], "--layers"),
    (["--layers", ""], "--layers"),
    (["--layers", "1-0"], "inverted"),
])
def test_a_refused_run_writes_nothing(tiny_checkpoint, tmp_path, extra, message):
    """Was: run.json (and split.json) were written before the data and the configuration were
    checked, so a refused run left a directory behind, and running the corrected command in it
    was refused as "a run with other settings" (users: 2 -> 7, layers: '0,5' -> 'all', ...)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        train.main(["--model", str(tiny_checkpoint), *_fast(out), *extra])
    assert not out.exists()


def test_a_run_with_missing_data_writes_nothing(tmp_path, capsys):
    """The same for data errors reported by ``main`` (exit 2): a missing or directory --data."""
    for i, data in enumerate([tmp_path / "none.jsonl", tmp_path]):
        out = tmp_path / f"run{i}"
        assert train.main([*_fast(out), "--data", str(data)]) == 2
        assert "milp.train: error: --data" in capsys.readouterr().err
        assert not out.exists()


def test_a_refused_overwrite_keeps_the_old_run(tiny_checkpoint, tmp_path):
    """Was: ``--overwrite`` deleted the old run before the new settings were checked: a typo
    lost the old run and left a run.json of the refused settings."""
    out = tmp_path / "run"
    st_ = _state(parse(*_fast(out)))
    train._prepare_output(st_)
    before = (out / "run.json").read_bytes()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="--layers"):
        train.main(["--model", str(tiny_checkpoint), *_fast(out), "--overwrite", "--layers", "7"])
    assert (out / "run.json").read_bytes() == before and (out / "metrics.json").exists()


def test_overwrite_refuses_to_delete_a_directory_that_holds_no_run(tmp_path):
    """Was: ``--overwrite --output DIR`` ran ``shutil.rmtree(DIR)`` on any directory (``.``,
    a home folder)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds no milp.train run"):
        train.main([*_fast(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "keep me"
    train._check_output(_state(parse(*_fast(tmp_path / "empty"), "--overwrite")))  # absent: fine
    (tmp_path / "empty").mkdir()
    train._check_output(_state(parse(*_fast(tmp_path / "empty"), "--overwrite")))  # empty: fine


def test_output_that_is_a_file_or_empty_is_refused(tmp_path):
    """Was: a file as --output raised FileExistsError from ``mkdir`` (a traceback)."""
    f = tmp_path / "file"
    f.write_text("x")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="--output: .* is not a directory"):
            train.main([*_fast(f), *extra])
    assert f.read_text() == "x"
    with pytest.raises(SystemExit, match="--output: .* is inside .*file, which is not a directory"):
        train.main([*_fast(f / "sub" / "run")])  # was: NotADirectoryError once the model had loaded
    with pytest.raises(SystemExit, match="--output: expected a directory path"):
        train._check_output(_state(parse("--output", "")))


# --------------------------------------------------------------------------- resumption check
def _state(args: argparse.Namespace, device: str = "cpu") -> train._State:
    return train._State(args=args, out=Path(args.output), dist=train.Dist(), device=torch.device(device))


#: one changed flag each; the volatile ones may change when a run resumes
CHANGES = {
    "rank": ["--rank", "4"], "users": ["--users", "5"], "seed": ["--seed", "3"], "layers": ["--layers", "0"],
    "lora_alpha": ["--lora-alpha", "8"], "search_ranks": ["--search-ranks", "8,16"],
    "search_dims": ["--search-dims", "size"], "search_modules": ["--search-modules", "1-4"],
    "memory_lr": ["--memory-lr", "1e-3"], "data": ["--data", "x.jsonl"], "model": ["--model", "m"],
    "search_init": ["--search-init", "3"], "max_length": ["--max-length", "64"], "dtype": ["--dtype", "float16"],
}
VOLATILE = {"slots": ["--slots", "2"], "eval_batch_size": ["--eval-batch-size", "3"], "progress": ["--no-progress"],
            "on_error": ["--on-error", "skip"], "device": ["--device", "cpu"]}


@SETTINGS
@given(changed=st.sets(st.sampled_from(sorted(CHANGES))), volatile=st.sets(st.sampled_from(sorted(VOLATILE))))
def test_a_resumption_is_refused_iff_a_setting_changed(changed, volatile):
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "run")
        train._prepare_output(_state(parse("--output", out)))
        argv = ["--output", out] + [a for k in sorted(changed) for a in CHANGES[k]] \
            + [a for k in sorted(volatile) for a in VOLATILE[k]]
        st_ = _state(parse(*argv))
        if not changed:
            train._check_output(st_)
            return
        with pytest.raises(SystemExit) as e:
            train._check_output(st_)
        said = str(e.value)
        assert all(f"{k}: " in said for k in changed)
        assert not any(f"{k}: " in said for k in volatile)


def test_a_resumption_on_another_device_keeps_the_dtype_it_ran_in(tmp_path):
    """Was: ``--dtype auto`` ran in float32 on CPU; resumed with ``--device cuda`` (a volatile
    setting) it went on in bfloat16, silently: users injected in one precision, instruction-tuned
    and evaluated in another. Now the dtype the run ran in is compared, not the word auto."""
    out = str(tmp_path / "run")
    train._prepare_output(_state(parse("--output", out)))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "float32"
    with pytest.raises(SystemExit, match=r"dtype: 'float32' -> 'bfloat16' \(--dtype auto on cuda\)"):
        train._check_output(_state(parse("--output", out, "--device", "cuda"), device="cuda"))
    train._check_output(_state(parse("--output", out, "--device", "cuda", "--dtype", "float32"), device="cuda"))
    train._check_output(_state(parse("--output", out, "--dtype", "float32")))
    with pytest.raises(SystemExit, match="dtype: 'float32' -> 'bfloat16'"):
        train._check_output(_state(parse("--output", out, "--dtype", "bfloat16")))


def test_path_settings_are_recorded_absolute_and_compared_as_paths(tmp_path, monkeypatch):
    """Was: --data and --model were recorded and compared as typed. A resume naming the same
    file as ``./d.jsonl`` for ``d.jsonl`` was refused; a resume from another working directory
    with the same relative text was taken for the same run, on other files; and milp.answer,
    run from elsewhere, loaded the base model from a path relative to its own directory."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    out = str(tmp_path / "run")
    train._prepare_output(_state(parse("--output", out, "--data", "d.jsonl", "--model", "~/m")))
    ran = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert ran["data"] == str(tmp_path / "a" / "d.jsonl")
    assert ran["model"] == os.path.join(os.path.expanduser("~"), "m")
    train._check_output(_state(parse("--output", out, "--data", "./d.jsonl", "--model", "~/m")))
    train._check_output(_state(parse("--output", out, "--data", str(tmp_path / "a" / "d.jsonl"),
                                     "--model", os.path.expanduser("~/m/"))))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(SystemExit, match=r"data: .*a/d\.jsonl' -> .*b/d\.jsonl'"):
        train._check_output(_state(parse("--output", out, "--data", "d.jsonl", "--model", "~/m")))
    train._check_output(_state(parse("--output", out, "--data", "../a/d.jsonl", "--model", "~/m")))


def test_a_run_json_with_relative_paths_reads_them_from_here(tmp_path, monkeypatch):
    """A run.json from before the paths were recorded absolute: its relative paths are read
    from the working directory, as they were when it ran from there."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train._prepare_output(_state(parse("--output", str(out), "--data", "d.jsonl")))
    run = json.loads((out / "run.json").read_text())
    run["settings"]["data"] = "d.jsonl"
    (out / "run.json").write_text(json.dumps(run))
    train._check_output(_state(parse("--output", str(out), "--data", "./d.jsonl")))
    with pytest.raises(SystemExit, match="data: "):
        train._check_output(_state(parse("--output", str(out), "--data", "e.jsonl")))


def test_a_run_json_without_the_dtype_compares_the_flag(tmp_path):
    """A run.json written before the dtype was recorded: ``--dtype`` compared as given."""
    out = tmp_path / "run"
    train._prepare_output(_state(parse("--output", str(out))))
    run = json.loads((out / "run.json").read_text())
    del run["dtype"]
    (out / "run.json").write_text(json.dumps(run))
    train._check_output(_state(parse("--output", str(out), "--device", "cuda"), device="cuda"))
    with pytest.raises(SystemExit, match="dtype: 'auto' -> 'float32'"):
        train._check_output(_state(parse("--output", str(out), "--dtype", "float32")))


@pytest.mark.parametrize("text", ["", "{", "[]", "{}", '{"settings": 3}', '{"settings": [1]}'])
def test_a_damaged_run_json_is_reported_by_name(tmp_path, text):
    """Was: JSONDecodeError ("Expecting value: line 1 column 1") without the file, or KeyError /
    TypeError tracebacks."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(text)
    with pytest.raises(SystemExit, match=r"run.json is not a milp.train run file"):
        train._check_output(_state(parse("--output", str(out))))


# --------------------------------------------------------------------------- device, dtype, Dist
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_cpu_and_auto(monkeypatch):
    _no_cuda(monkeypatch)
    assert train._resolve_device("auto") == torch.device("cpu")
    assert train._resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        train._resolve_device("cuda")
    with pytest.raises(SystemExit, match="not a device"):
        train._resolve_device("gpu")


@pytest.mark.parametrize("text", ["meta", "xla", "mps", "xpu"])
def test_resolve_device_refuses_a_device_this_machine_lacks(monkeypatch, text):
    """Was: returned as is; the run then failed deep in ``model.to`` (or, on meta, held no data)."""
    if text != "meta":
        try:
            torch.empty(0, device=text)
            pytest.skip(f"{text} is available here")
        except Exception:
            pass
    with pytest.raises(SystemExit, match="--device"):
        train._resolve_device(text)


def test_resolve_device_cuda_index_and_torchrun_ranks(monkeypatch):
    """Was: ``cuda:5`` on a machine of 2 GPUs was accepted; under ``torchrun`` on GPUs every
    process took ``cuda`` = cuda:0 (NCCL refuses two ranks on one GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert train._resolve_device("auto") == torch.device("cuda")
    assert train._resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SystemExit, match="has 2 CUDA device"):
        train._resolve_device("cuda:5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train._resolve_device("auto") == torch.device("cuda:1")
    assert train._resolve_device("cuda") == torch.device("cuda:1")
    assert train._resolve_device("cuda:0") == torch.device("cuda:0")  # an explicit index stays
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SystemExit, match="has 2 CUDA device"):
        train._resolve_device("auto")


def test_dist_under_torchrun_uses_this_ranks_gpu(monkeypatch):
    """Was: every process stayed on the current device, cuda:0, for NCCL's collectives. The
    processes wait for each other on a gloo group of their own, for ``$MILP_DIST_TIMEOUT_S``
    (default 4 h; NCCL's collectives time out after 10 minutes)."""
    import datetime

    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MILP_DIST_TIMEOUT_S", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: calls.append(("group", backend, timeout)) or "g")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    d = train.Dist.from_env(torch.device("cuda:1"))
    assert (d.rank, d.world, d.initialized, d.control) == (1, 2, True, "g")
    four_hours = datetime.timedelta(hours=4)
    assert calls == [("set_device", torch.device("cuda:1")), ("init", "nccl"), ("group", "gloo", four_hours)]
    calls.clear()
    monkeypatch.setenv("MILP_DIST_TIMEOUT_S", "90")
    train.Dist.from_env(torch.device("cpu"))
    assert calls == [("init", "gloo"), ("group", "gloo", datetime.timedelta(seconds=90))]


@pytest.mark.parametrize("dtype, device, bf16, want", [("auto", "cpu", False, torch.float32),
                                                       ("auto", "cuda", True, torch.bfloat16),
                                                       ("auto", "cuda", False, torch.float32),
                                                       ("float16", "cpu", False, torch.float16),
                                                       ("bfloat16", "cpu", False, torch.bfloat16),
                                                       ("bfloat16", "cuda", False, torch.bfloat16),
                                                       ("float32", "cuda", True, torch.float32)])
def test_dtype_follows_the_flag_and_the_device(monkeypatch, dtype, device, bf16, want):
    """``auto``: bf16 on a GPU that computes in it natively (compute capability 8.0+), float32 on
    one that would emulate it (V100, T4: was bf16) and on CPU; a named dtype is that dtype."""
    monkeypatch.setattr(train, "_native_bf16", lambda dev: bf16)
    assert train._dtype(parse("--dtype", dtype), torch.device(device)) == want
    assert mm._check_dtype(train._dtype(parse("--dtype", dtype), torch.device(device))) == want


@pytest.mark.parametrize("world", ["two", "", "1.0"])
def test_dist_refuses_a_malformed_world_size(monkeypatch, world):
    """Was: ValueError "invalid literal for int() with base 10: 'two'", not naming WORLD_SIZE."""
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        train.Dist.from_env(torch.device("cpu"))


@pytest.mark.parametrize("world", ["1", "0", "-3"])
def test_dist_without_torchrun_is_one_process(monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    d = train.Dist.from_env(torch.device("cpu"))
    assert (d.rank, d.world, d.initialized, d.main) == (0, 1, False, True)


@SETTINGS
@given(items=st.lists(st.integers(), max_size=20), world=st.integers(1, 6))
def test_dist_shards_partition_the_items(items, world):
    shards = [train.Dist(rank, world, False).shard(items) for rank in range(world)]
    assert sorted(x for s in shards for x in s) == sorted(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --------------------------------------------------------------------------- milp.models: dtypes
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   "float16", "half", "bfloat16", "float32", "float", "float64", "double"])
def test_check_dtype_accepts_the_floating_point_weight_dtypes(dtype):
    got = mm._check_dtype(dtype)
    assert got is None if dtype is None else got.is_floating_point


@pytest.mark.parametrize("dtype", ["int64", "bool", "uint8", "complex64", "float8_e4m3fn", "Tensor", "cuda",
                                   torch.int8, torch.bool, torch.complex64, 32, 1.0, "float32 ", "Float32"])
def test_check_dtype_refuses_non_floating_point_dtypes(dtype, tmp_path):
    """Was: ``dtype="int64"`` / ``torch.bool`` / ``float8_e4m3fn`` passed the check and went on
    to ``from_pretrained``, failing deep inside (or casting the weights to integers). Refused
    before anything else: the path is not even looked at, no cache is built."""
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* of floating point"):
        mm._check_dtype(dtype)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* of floating point"):
        mm.load_model(tmp_path / "missing", dtype=dtype)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* of floating point"):
        mm.load_default_model(dtype=dtype, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- milp.models: the cache
class _Saves:
    """A stand-in model / tokenizer whose ``save_pretrained`` writes ``files`` (or raises at one)."""

    def __init__(self, files: list[str], fail_at: str | None = None) -> None:
        self.files, self.fail_at = files, fail_at

    def save_pretrained(self, path, **kw) -> None:
        for f in self.files:
            if f == self.fail_at:
                raise OSError(f"disk full writing {f}")
            (Path(path) / f).write_text("x")


STEPS = ["loader", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "marker", "rename"]


@pytest.mark.parametrize("fail_at", STEPS)
@pytest.mark.parametrize("target_was", ["absent", "incomplete", "valid"])
def test_a_cache_build_failing_anywhere_leaves_no_half_cache(tmp_path, monkeypatch, fail_at, target_was):
    """Failing at any step (the loader, any file, the marker, the final rename), a build leaves the
    entry as it was (absent, an incomplete copy that is not valid, another process's valid
    entry) and no temporary directory; succeeding, the entry is valid and holds every file."""
    target = tmp_path / "cache" / "entry"
    if target_was != "absent":
        target.mkdir(parents=True)
        (target / "config.json").write_text("old")
        if target_was == "valid":
            (target / mm._CACHE_MARKER).write_text("{}")

    def loader():
        if fail_at == "loader":
            raise RuntimeError("de-quantization failed")
        return _Saves(["config.json", "model.safetensors"], fail_at), _Saves(["tokenizer.json",
                                                                               "tokenizer_config.json"], fail_at)

    real_write, real_rename = Path.write_text, os.rename

    def write_text(self, *a, **k):
        if self.name == mm._CACHE_MARKER and fail_at == "marker" and ".tmp-" in self.parent.name:
            raise OSError("disk full writing the marker")
        return real_write(self, *a, **k)

    def rename(src, dst):
        if fail_at == "rename":
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "rename", rename)
    if target_was == "valid" and fail_at == "rename":  # the rename lost to a complete entry: kept, no error
        mm._build_cache(target, loader, {"format": 1})
    else:
        with pytest.raises((OSError, RuntimeError)):
            mm._build_cache(target, loader, {"format": 1})
    left = [p.name for p in target.parent.iterdir()]
    assert left == (["entry"] if target_was == "valid" else []) or (target_was == "incomplete" and left == ["entry"])
    assert mm._is_valid_cache(target) == (target_was == "valid")
    monkeypatch.setattr(os, "rename", real_rename)
    monkeypatch.setattr(Path, "write_text", real_write)
    mm._build_cache(target, lambda: (_Saves(["config.json", "model.safetensors"]),
                                     _Saves(["tokenizer.json"])), {"format": 1})
    assert mm._is_valid_cache(target) and [p.name for p in target.parent.iterdir()] == ["entry"]
    if target_was != "valid":  # rebuilt whole; a valid entry of another process is kept
        assert (target / "model.safetensors").is_file() and (target / "config.json").read_text() == "x"


def test_cache_build_takes_back_what_killed_builds_left(tmp_path):
    """Was: the temp folder of a build killed mid-way (~0.5 GB) stayed forever; one of a build
    still running (recent) is left alone."""
    target = tmp_path / "entry"
    dead, live = tmp_path / ".entry.tmp-dead", tmp_path / ".entry.tmp-live"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    old = time.time() - mm._STALE_BUILD_S - 60
    os.utime(dead, (old, old))
    (tmp_path / ".other.tmp-dead").mkdir()  # another entry's: not this build's business
    os.utime(tmp_path / ".other.tmp-dead", (old, old))
    mm._build_cache(target, lambda: (_Saves(["config.json"]), _Saves(["tokenizer.json"])), {"format": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.tmp-live", ".other.tmp-dead", "entry"]


# --------------------------------------------------------------------------- milp.models: SentenceEmbedder
@pytest.fixture(scope="module")
def embedder():
    try:
        mm.find_default_embedder()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    return mm.load_default_embedder()


def test_embedder_max_length_within_the_encoders_positions(embedder):
    """Was: max_length above the encoder's 512 positions was accepted; a long text then failed
    inside the model."""
    limit = embedder.model.config.max_position_embeddings
    mm.SentenceEmbedder(embedder.model, embedder.tokenizer, max_length=limit)
    with pytest.raises(ValueError, match="max_length must be <= the encoder's max_position_embeddings"):
        mm.SentenceEmbedder(embedder.model, embedder.tokenizer, max_length=limit + 1)


WORDS = ["chest", "pain", "the", "doctor", "said", "rest", "water", "knee", "run", "fever", "?", "."]
sentences = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(["", " ", "\n\t", "\u200b", "\x00"]),
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.lists(sentences, max_size=4), b=st.lists(sentences, max_size=4), batch_size=st.integers(1, 5))
def test_embedder_rows_do_not_depend_on_the_batch(embedder, a, b, batch_size):
    """``encode(a + b) == encode(a) ++ encode(b)`` for any batch size, to float tolerance; every
    row is a unit vector, or zeros for a text without any token of its own."""
    whole = embedder.encode(a + b)
    old = embedder.batch_size
    try:
        embedder.batch_size = batch_size
        parts = torch.cat([embedder.encode(a), embedder.encode(b)])
    finally:
        embedder.batch_size = old
    assert whole.shape == (len(a) + len(b), 384) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    tok = embedder.tokenizer
    for t, n in zip(a + b, whole.norm(dim=1).tolist()):
        content = len(tok(t, add_special_tokens=False)["input_ids"]) > 0 and t.strip()
        assert n == pytest.approx(1.0 if content else 0.0, abs=1e-5), t


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\ufffd", "\u200b \u200b"])
def test_embedder_gives_zeros_for_a_text_without_tokens(embedder, text):
    """Was: "" gave zeros, but a text the tokenizer drops whole (a zero-width space, NUL, ...)
    gave the unit vector of "[CLS] [SEP]" alone: a similarity to every other text out of nothing."""
    assert embedder.tokenizer(text, add_special_tokens=False)["input_ids"] == []
    assert torch.equal(embedder.encode([text, "", "chest pain"])[:2], torch.zeros(2, 384))


def test_embedder_empty_input_and_long_texts(embedder):
    assert embedder.encode([]).shape == (0, 384)
    assert embedder.encode(()).dtype == torch.float32
    long = " ".join(WORDS * 200)  # ~2,400 tokens: truncated to max_length (256)
    v = embedder.encode([long, long + " and a tail past the window"])
    assert v.shape == (2, 384) and v[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(v[0], v[1])  # what lies past max_length tokens changes nothing


def test_embedder_takes_any_iterable_of_str_and_refuses_others(embedder):
    """Was: a generator was consumed by the type check, then failed with "object of type
    'generator' has no len()"."""
    texts = ["chest pain", "knee"]
    torch.testing.assert_close(embedder.encode(t for t in texts), embedder.encode(texts))
    for bad in ("chest pain", b"chest pain", 3, ["a", 3], [None]):
        with pytest.raises(TypeError, match="texts must be a sequence of str"):
            embedder.encode(bad)
