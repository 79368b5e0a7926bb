"""bench/report.py against the inputs a rare GPU session can leave behind: stages cut short by
their time limit (workloads or baselines missing, a target with no measurement), several stage
JSONs merged (the same benchmark twice, different machines or commits), NaN/inf/zero times,
missing or damaged ``extra_info``, older bench files, empty and broken JSONs, CPU runs.

The invariants: the report is written, every markdown table stays a table (as many cells per
row as header columns, no 'nan'/'None' for a missing figure), a speed target says 'yes' or
'**no**' only from a measurement and 'no measurement' otherwise, the README block is replaced
idempotently and atomically, and the CLI names a file it cannot use."""
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_bench_tools import ROOT, _module

report = _module("report")

GPU = {"device": "NVIDIA H200", "cuda": "13.0", "torch": "2.11.0+cu130", "triton": "3.6.0", "peft": "0.21.0",
       "kernels": "0.1.0", "backend": "triton", "git_commit": "e79670f1d45ca413a2994adf7dc2ff3891421147",
       "bench_size": "full", "dtype": "bfloat16", "cpu_threads": 16,
       "peaks": {"device": "NVIDIA H200", "dtype": "bfloat16", "tflops": 694.2, "gbs": 4233.0,
                 "matmul": "8192x8192x8192 bfloat16 mm: 1.584 ms", "copy": "1024 MiB copy (read+write): 0.507 ms"},
       "config_files": ["nvidia_h200.json", "sm_90.json"], "dispatch": {"decode_max_tokens": 64}}


def _entry(impl, ms, *, op="fwd", shape="7b-up", phase="prefill", T=4096, users=32, ranks="mix", none=0.1,
           graph=None, roof=1.0, **extra):
    """A benchmark as ``pytest bench --benchmark-json`` writes it (the H200 run's fields)."""
    wl = f"{op}:{shape}-{phase}-T{T}-U{users}-{ranks}" + (f"-none{round(none * 100)}" if none else "")
    e = {"op": op, "shape": shape, "k": 4096, "n": 11008, "phase": phase, "T": T, "users": users, "ranks": ranks,
         "modules": 1, "none_share": none, "adapter_tokens": T, "sum_rank_users": 1376, "max_rank": 96,
         "workload": wl, "impl": impl, "tokens": T, "flops": 3.7e11, "bytes": 1.6e8, "device": "NVIDIA H200",
         "dtype": "bfloat16", "timing": "cuda-events-median-l2-flushed", "event_reps": 100,
         "roofline_ms": roof, "bound": "compute", "rel_err": 1.9e-3}
    if ms is not None:
        e["time_ms"] = ms
        if isinstance(ms, (int, float)) and ms > 0 and math.isfinite(ms):
            e.update(tflops=3.7e11 / ms / 1e9, gbs=1.6e8 / ms / 1e6, pct_roofline=100 * roof / ms)
    if graph is not None:
        e["graph_ms"] = graph
    e.update(extra)
    return {"group": wl, "name": f"test_lora_linear[{wl}-{impl}]",
            "fullname": f"bench/test_lora_linear.py::test_lora_linear[{wl}-{impl}]",
            "params": {"impl": impl}, "param": f"{wl}-{impl}", "extra_info": e,
            "options": {"timer": "_sync_timer"}, "stats": {"min": 1e-3, "median": 1.1e-3, "rounds": 5}}


def _write(path, benches, machine=GPU, when="2026-11-28T05:38:37.600939+00:00", **top):
    data = {"machine_info": {"python_version": "3.12.3", "milp": machine} if machine is not None else {},
            "commit_info": {"id": (machine or {}).get("git_commit")}, "datetime": when, "benchmarks": benches,
            "version": "5.3.1", **top}
    path.write_text(json.dumps(data))
    return str(path)


def _cells(line):
    """The cells of a markdown table row (a ``\\|`` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _tables(md):
    """Every table of a markdown text as (header cells, rows of cells), checked to be well formed."""
    lines, tables, i = md.split("\n"), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].startswith("|"):
            block.append(lines[i])
            i += 1
        head = _cells(block[0])
        assert re.fullmatch(r"\|(---\|)+", block[1]) and block[1].count("---") == len(head), block[:2]
        rows = [_cells(r) for r in block[2:]]
        for r, line in zip(rows, block[2:], strict=True):
            assert len(r) == len(head), f"{len(r)} cells for {len(head)} columns: {line}"
            assert line.endswith(" |")
            for c in r:
                assert c.lower() not in ("nan", "none", "-nan"), line
        tables.append((head, rows))
    return tables


def _targets(md):
    """The rows of the issue-3 table: {target label: [(workload, milp/base, graph, floor, limit, met)]}."""
    for head, rows in _tables(md):
        if head[:2] == ["target", "workload"] and "milp/base" in head:
            out = {}
            for r in rows:
                out.setdefault(r[0], []).append(r[1:])
            return out
    raise AssertionError("no speed-target table")


def _runtime(md):
    for head, rows in _tables(md):
        if head[:3] == ["target", "workload", "measured"]:
            return rows
    return []


def _md(tmp_path, *paths, **kw):
    return report.build(list(paths), tmp_path / "out", **kw)[0].read_text(encoding="utf-8")


LABELS = [t[0] for t in report.TARGETS]
FWD, DECODE, FWDBWD = LABELS


def _no_plots(monkeypatch):
    monkeypatch.setattr(report, "plot_speedup_vs_users", lambda *a, **k: False)
    monkeypatch.setattr(report, "plot_pct_peak_vs_tokens", lambda *a, **k: False)


# =========================================================================== a run cut short
def test_a_target_no_workload_of_the_run_has_says_no_measurement(tmp_path, monkeypatch):
    """The stage ran out of time before the decode and backward workloads: their targets are
    listed as not measured, not dropped from the table (nor from the README's)."""
    _no_plots(monkeypatch)
    run = _write(tmp_path / "bench_quick_kernels.json", [_entry("milp", 1.05), _entry("base", 1.0)])
    t = _targets(_md(tmp_path, run))
    assert t[FWD] == [["`7b-up-prefill-T4096-U32-mix-none10`", "1.050", "–", "1.000", "≤ 1.10", "yes"]]
    assert t[DECODE] == [["–", "–", "–", "–", "≤ 1.15", "no measurement"]]
    assert t[FWDBWD] == [["–", "–", "–", "–", "≤ 1.25", "no measurement"]]


def test_a_target_workload_with_only_its_base_measured_is_no_measurement(tmp_path, monkeypatch):
    """Cut short after the base, before ours (or ours failed its check and never ran): the
    workload's target row says so; the op table shows the base's time."""
    _no_plots(monkeypatch)
    run = _write(tmp_path / "b.json", [_entry("base", 1.0), _entry("loop", 9.0)])
    md = _md(tmp_path, run)
    assert _targets(md)[FWD] == [["`7b-up-prefill-T4096-U32-mix-none10`", "–", "–", "–", "≤ 1.10", "no measurement"]]
    assert "| `7b-up-prefill-T4096-U32-mix-none10` | – | 1 | 9 | – | – |" in md


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0, None, "1.0"])
def test_a_time_that_is_no_measurement_gives_no_ratio_and_no_verdict(tmp_path, monkeypatch, bad):
    """A zero time made milp/base 0 and the target 'yes'; NaN made it '**no**' and printed
    'nan'; None or a string crashed the ratios. None of them is a measurement."""
    _no_plots(monkeypatch)
    # what _util.run derives from such a time (inf), and a ratio the JSON holds: recomputed, not trusted
    ours = _entry("milp", bad, ratio_vs_base=0.5, tflops=math.inf, gbs=math.inf, pct_roofline=math.inf)
    if bad is None:
        ours["extra_info"]["time_ms"] = None
    run = _write(tmp_path / "b.json", [ours, _entry("base", 1.0), _entry("loop", 9.0)])
    md = _md(tmp_path, run)
    [row] = _targets(md)[FWD]
    assert row[1] == "–" and row[-1] == "no measurement"
    (wl_row,) = [r for h, rows in _tables(md) if h[:2] == ["workload", "milp ms"] for r in rows]
    assert wl_row[1:3] == ["–", "1"] and wl_row[4:6] == ["–", "–"]  # milp ms, base ms; milp/base, ×loop
    assert wl_row[6:9] == ["–", "–", "–"]  # TFLOP/s, GB/s, %roof: nothing derived from no time


def test_a_zero_or_nan_base_time_gives_no_ratio_either(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    for i, bad in enumerate((0.0, float("nan"))):
        run = _write(tmp_path / f"b{i}.json", [_entry("milp", 1.0), _entry("base", bad)])
        [row] = _targets(_md(tmp_path, run))[FWD]
        assert row[1] == "–" and row[-1] == "no measurement"


def test_the_graph_ratio_alone_decides_a_decode_target(tmp_path, monkeypatch):
    """A decode workload whose event time was lost but whose graph replays were timed."""
    _no_plots(monkeypatch)
    kw = dict(phase="decode", T=32, users=32, none=0.0)
    run = _write(tmp_path / "b.json", [_entry("milp", None, graph=0.11, **kw), _entry("base", 0.1, graph=0.1, **kw)])
    [row] = _targets(_md(tmp_path, run))[DECODE]
    assert row[1:3] == ["–", "1.100"] and row[-1] == "yes"


def test_the_runtime_decode_target_with_only_the_base_measured(tmp_path, monkeypatch):
    """The H200 run: the runtime stage's limit ended it after the base model's decode, before
    ours. The decode target is listed as not measured; the training target as measured."""
    _no_plots(monkeypatch)
    rt = json.loads((ROOT / "bench" / "results" / "gpu" / "bench_quick_runtime.json").read_text())
    md = _md(tmp_path, _write(tmp_path / "bench_quick_runtime.json", rt["benchmarks"], rt["machine_info"]["milp"]))
    rows = _runtime(md)
    assert [r[1] for r in rows] == ["`runtime-train-U16-4x256`", "`runtime-decode-U32-p64-n64`"]
    assert rows[0][2] == "11.46" and rows[0][-1] == "yes"
    assert rows[1][2] == "–" and rows[1][-2:] == ["≥ 0.85", "no measurement"]


def test_a_runtime_target_without_its_baseline_or_workloads(tmp_path, monkeypatch):
    """Ours trained but the sequential loop did not run (no target key, no ratio): 'no
    measurement'; a GPU run without the decode workloads lists that target too."""
    _no_plots(monkeypatch)
    ours = {"extra_info": {"workload": "runtime-train-U16-4x256", "impl": "milp", "time_ms": 300.0, "phase": "train"}}
    rows = _runtime(_md(tmp_path, _write(tmp_path / "r.json", [ours])))
    train, decode = (t[0] for t in report.RUNTIME_TARGETS)
    assert rows == [[train, "`runtime-train-U16-4x256`", "–", "–", "≥ 4.00", "no measurement"],
                    [decode, "–", "–", "–", "≥ 0.85", "no measurement"]]


def test_a_cpu_run_lists_no_unmeasured_targets(tmp_path, monkeypatch):
    """CPU: the targets do not apply; the table keeps its one line when no workload matches."""
    _no_plots(monkeypatch)
    cpu = dict(GPU, device="cpu", cuda=None, backend="torch (CPU path of the ops)", dtype="float32")
    md = _md(tmp_path, _write(tmp_path / "c.json", [_entry("milp", 1.0, shape="7b-up-small")], cpu))
    assert "| (no workload of this run matches a target) | | | | | | |" in md
    assert "no measurement" not in md and "Runtime targets" not in md
    md = _md(tmp_path, _write(tmp_path / "c.json", [_entry("milp", 1.0), _entry("base", 0.5)], cpu))
    assert _targets(md)[FWD][0][1:] == ["2.000", "–", "1.000", "≤ 1.10", "n/a (CPU)"]


# =========================================================================== merged stage files
def test_a_benchmark_in_several_files_is_taken_from_the_newest_run_and_said(tmp_path, monkeypatch):
    """A stage rerun (or two stages that measured the same workload): the newest run's time is
    shown whatever the order of the files on the command line, and a note names the files."""
    _no_plots(monkeypatch)
    old = _write(tmp_path / "bench_z_old.json", [_entry("milp", 2.0), _entry("base", 1.0)],
                 when="2026-11-28T05:00:00+00:00")
    new = _write(tmp_path / "bench_a_new.json", [_entry("milp", 1.05)], when="2026-11-28T06:00:00+00:00")
    for paths in ([old, new], [new, old]):
        md = _md(tmp_path, *paths)
        assert _targets(md)[FWD][0][1] == "1.050"
        assert "1 benchmark(s) ran in several files; the newest run's is shown" in md
        assert "bench_a_new.json's" in md
        assert md.count("| `7b-up-prefill-T4096-U32-mix-none10` |") == 1 + 1  # target row + op row


def test_the_machine_info_comes_from_a_file_that_has_it_and_differences_are_noted(tmp_path, monkeypatch):
    """A first file without the bench's machine_info (an empty stage, another tool's JSON) does
    not make the run 'unknown'; files from another dtype or commit are noted in the header."""
    _no_plots(monkeypatch)
    empty = _write(tmp_path / "bench_a.json", [], machine=None, when=None)
    gpu = _write(tmp_path / "bench_b.json", [_entry("milp", 1.05), _entry("base", 1.0)])
    other = _write(tmp_path / "bench_c.json", [_entry("loop", 9.0)],
                   dict(GPU, dtype="float16", git_commit="0123456789"))
    out = report.build([empty, gpu, other], tmp_path / "out")
    md = out[0].read_text()
    assert out[0].name == "gpu_nvidia_h200.md"
    assert "| device | NVIDIA H200 (CUDA 13.0) |" in md and "| dtype | bfloat16 |" in md
    assert "> note: the files differ in dtype: bench_b.json bfloat16, bench_c.json float16 (the header" in md
    assert "> note: the files differ in git_commit:" in md and "0123456789" in md
    assert "differ in device" not in md
    h100 = _write(tmp_path / "bench_d.json", [], dict(GPU, device="NVIDIA H100 80GB HBM3"))
    assert "do not compare across them" in _md(tmp_path, gpu, h100)


def test_an_older_json_without_the_kernel_choice_fields_says_not_recorded(tmp_path, monkeypatch):
    """The H200 run's files predate machine_info's config_files/dispatch: the header must not
    claim that no config file was read; a missing date or commit is '?', never 'None'."""
    _no_plots(monkeypatch)
    old = {k: v for k, v in GPU.items() if k not in ("config_files", "dispatch", "git_commit")}
    md = _md(tmp_path, _write(tmp_path / "old.json", [_entry("milp", 1.0)], old, when=None))
    assert "| config files | not recorded (older bench files) |" in md
    assert "| dispatch knobs | not recorded (older bench files) |" in md
    assert "| date (UTC) | ? |" in md and "| git commit | unknown |" in md
    now = dict(GPU, config_files=[], dispatch={})
    md = _md(tmp_path, _write(tmp_path / "new.json", [_entry("milp", 1.0)], now))
    assert "| config files | none (heuristics) |" in md


@pytest.mark.parametrize("damage", [
    {"peaks": 5}, {"peaks": [1.0]}, {"config_files": 5}, {"config_files": "a.json"}, {"dispatch": [1]},
    {"dispatch": "split"},
])
def test_a_damaged_machine_info_field_reads_as_unknown(tmp_path, monkeypatch, damage):
    """A machine_info field of the wrong JSON type (a hand-edited or damaged file) crashed the header
    (``'int' object has no attribute 'get'``); it reads ``?`` and the rest of the report stands."""
    _no_plots(monkeypatch)
    md = _md(tmp_path, _write(tmp_path / "b.json", [_entry("milp", 1.0), _entry("base", 0.9)], dict(GPU, **damage)))
    field = {"peaks": "peak compute (measured this run)", "config_files": "config files",
             "dispatch": "dispatch knobs"}[next(iter(damage))]
    (row,) = [r for h, rows in _tables(md) if h == ["", ""] for r in rows if r[0] == field]
    assert row[1] in ("?", "– TFLOP/s — ?"), row
    assert _targets(md)[FWD][0][1] == "1.111"
    data = json.loads((tmp_path / "b.json").read_text())
    data["commit_info"] = 3  # not an object either
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert "| git commit |" in _md(tmp_path, str(tmp_path / "c.json"))


# =========================================================================== damaged entries
def test_cells_with_pipes_or_line_breaks_keep_the_tables_whole(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    odd = _entry("milp", 1.0, op="fwd", shape="a|b", bound=None)
    other = {"name": "test_x[a|b]", "fullname": "bench/test_x.py::test_x[a|b]", "stats": {"median": 2e-3},
             "extra_info": {"graph_error": "RuntimeError: capture\nfailed | twice", "loadavg": [1.0, 2.0],
                            "ratio": float("nan")}}
    md = _md(tmp_path, _write(tmp_path / "b.json", [odd, other], dict(GPU, device="NVIDIA H200", peft=None)))
    tables = _tables(md)
    (row,) = [r for h, rows in tables if h[0] == "benchmark" for r in rows]
    assert row[0] == "`bench/test_x.py::test_x[a\\|b]`" and row[1] == "2" and row[2] == "–"
    assert row[3] == "graph_error=RuntimeError: capture failed \\| twice, loadavg=[1.0, 2.0], ratio=–"
    (wl,) = [r for h, rows in tables if h[:2] == ["workload", "milp ms"] for r in rows]
    assert wl[0] == "`a\\|b-prefill-T4096-U32-mix-none10`" and wl[-2] == "–"  # bound: None
    assert "| torch / triton / peft | 2.11.0+cu130 / 3.6.0 / ? |" in md


def test_entries_without_workload_fields_or_of_an_older_layout(tmp_path, monkeypatch):
    """An entry with only workload/impl/time (a forward with no ``:`` in its workload, fields of
    the wrong type), one with no stats: no crash, and no target matched by accident."""
    _no_plots(monkeypatch)
    bare = {"extra_info": {"workload": "7b-up-prefill-T4096-U32-mix-none10", "impl": "milp", "op": "fwd",
                           "time_ms": 1.0, "phase": "prefill", "shape": "7b-up", "T": 4096, "users": 32,
                           "ranks": "mix", "none_share": None}}
    typed = _entry("milp", 1.0, T="4096", users=None, shape="7b-down")
    nostats = {"name": "test_store_swap", "extra_info": {"workload": "runtime-store-swap-U6-S2", "op": "store"}}
    listed = {"name": "test_weird", "extra_info": ["not", "a", "dict"], "stats": None}
    md = _md(tmp_path, _write(tmp_path / "b.json", [bare, typed, nostats, listed, "not a benchmark"]))
    t = _targets(md)
    assert t[FWD] == [["–", "–", "–", "–", "≤ 1.10", "no measurement"]]  # none_share None, T a string
    _tables(md)
    assert "| `test_store_swap` | – | – | workload=runtime-store-swap-U6-S2, op=store |" in md
    assert "| `test_weird` | – | – |  |" in md


def test_a_forward_workload_without_the_op_prefix_matches_its_target(tmp_path, monkeypatch):
    """An ``extra_info`` whose workload has no ``op:`` prefix crashed the target table (IndexError)."""
    _no_plots(monkeypatch)
    benches = [_entry("milp", 1.05), _entry("base", 1.0)]
    for b in benches:
        b["extra_info"]["workload"] = "7b-up-prefill-T4096"
    [row] = _targets(_md(tmp_path, _write(tmp_path / "b.json", benches)))[FWD]
    assert row[0] == "`7b-up-prefill-T4096`" and row[-1] == "yes"


# =========================================================================== files and the CLI
@pytest.mark.parametrize("content, why", [
    ("", "not a readable JSON file"),
    ('{"machine_info": {}, "benchmarks": [', "not a readable JSON file"),  # cut off while written
    (b"\xff\xfe{}", "not a readable JSON file"),
    ("[]", "not a pytest-benchmark JSON"),
    ('{"machine": {}, "rows": []}', "not a pytest-benchmark JSON"),  # probe_split.json
    ('{"benchmarks": {}}', "not a pytest-benchmark JSON"),
])
def test_the_cli_names_a_file_it_cannot_read(tmp_path, capsys, content, why):
    bad = tmp_path / "bench_bad.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    good = _write(tmp_path / "bench_good.json", [_entry("milp", 1.0)])
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        report.main([good, str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert str(bad) in err and why in err
    assert not out.exists()


def test_the_cli_on_a_missing_file_an_empty_run_and_a_cpu_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert "no such JSON file" in capsys.readouterr().err
    empty = _write(tmp_path / "bench_empty.json", [])
    assert report.main([empty, "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "gpu_nvidia_h200.md").read_text()
    assert len(_tables(md)) == 3 and "## Plots" not in md
    assert not list((tmp_path / "o").glob("*.png"))
    cpu = ROOT / "bench" / "results" / "cpu_example.json"
    assert report.main([str(cpu), "--out", str(tmp_path / "c"), "--name", "x"]) == 0
    _tables((tmp_path / "c" / "x.md").read_text())
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "x.md", "x_pct_peak_vs_tokens.png", "x_speedup_vs_users.png"]


# =========================================================================== README
def test_the_readme_block_is_replaced_idempotently_and_its_markers_checked(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    run = _write(tmp_path / "b.json", [_entry("milp", 1.05), _entry("base", 1.0)])
    readme = tmp_path / "README.md"
    start, end = report.README_START, report.README_END
    readme.write_text(f"# t\n{start}\nold\n{end}\ntail `{end[:-4]}` stays\n")
    report.build([run], tmp_path / "out", readme=readme)
    once = readme.read_text()
    assert once.startswith(f"# t\n{start}\nLatest GPU run: **NVIDIA H200**") and once.endswith(
        f"{end}\ntail `{end[:-4]}` stays\n")
    assert "no measurement" in once  # the decode and backward targets of this run
    report.build([run], tmp_path / "out", readme=readme)
    assert readme.read_text() == once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]
    for text in (f"{end}\n{start}\n", f"{start}\n{start}\n{end}\n", f"{start}\n", ""):
        readme.write_text(text)
        with pytest.raises(ValueError, match="must hold the line"):
            report.build([run], tmp_path / "out2", readme=readme)
        assert readme.read_text() == text and not (tmp_path / "out2").exists()


def test_the_readme_refuses_a_run_that_does_not_say_its_device(tmp_path, monkeypatch):
    _no_plots(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    run = _write(tmp_path / "b.json", [_entry("milp", 1.0)], machine=None)
    with pytest.raises(ValueError, match="does not say which device"):
        report.build([run], tmp_path / "out", readme=readme)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "README.md"
    target.write_text("old\n")

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report._write_text(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["README.md"]


# =========================================================================== plots
def _wls(entries):
    benches = [{"extra_info": e} for e in entries]
    report.fill_ratios(benches)
    return report.workloads(benches)


def test_plots_of_no_point_one_point_and_damaged_points(tmp_path):
    """No series, a series of one point: no plot and no file. Points with no measurement (NaN,
    zero, missing users) are left out rather than crashing the sort or the log axis."""
    p = tmp_path / "p.png"
    assert not report.plot_speedup_vs_users(_wls([]), p, "t") and not p.exists()
    one = [_entry(i, 1.0 + (i == "loop"), phase="decode", T=32, users=32)["extra_info"] for i in ("milp", "loop")]
    assert not report.plot_speedup_vs_users(_wls(one), p, "t") and not p.exists()
    assert not report.plot_pct_peak_vs_tokens(_wls(one), p, "t") and not p.exists()
    pts = []
    for users, ms in ((8, 1.0), (32, float("nan")), (64, 0.0), (None, 1.0), (128, 2.0)):
        for impl, f in (("milp", 1.0), ("loop", 3.0), ("base", 0.5)):
            e = _entry(impl, ms * f, phase="decode", T=users, users=users)["extra_info"]
            e["workload"] += str(users)
            pts.append(e)
    assert report.plot_speedup_vs_users(_wls(pts), p, "t") and p.stat().st_size > 0
    pre = [_entry(i, ms, T=T, pct_roofline=float("inf") if T == 512 else 50.0)["extra_info"]
           for T, ms in ((512, 0.0), (4096, 1.0), (16384, 4.0)) for i in ("milp", "base")]
    assert report.plot_pct_peak_vs_tokens(_wls(pre), tmp_path / "q.png", "t")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.png", "q.png"]  # no temporaries left


def test_a_failed_plot_leaves_the_old_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = tmp_path / "p.png"
    target.write_bytes(b"old")
    fig = plt.figure()

    def broken(path, **kw):
        Path(path).write_bytes(b"half")
        raise RuntimeError("renderer died")

    fig.savefig = broken
    with pytest.raises(RuntimeError):
        report._save(fig, target, plt)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["p.png"]


@pytest.mark.parametrize("fails", ["second plot", "table", "readme block"])
def test_a_report_failing_part_way_leaves_every_old_file(tmp_path, monkeypatch, fails):
    """The plots, the table and the README are moved into place together at the end: a report
    that fails after its first plot (or while rendering the table or the README's block) leaves
    the previous report whole, not a new plot beside an old table, and no staging folder."""
    out = tmp_path / "out"
    out.mkdir()
    old = {"gpu_nvidia_h100_80gb_hbm3.md": b"old table", "gpu_nvidia_h100_80gb_hbm3_speedup_vs_users.png": b"old 1",
           "gpu_nvidia_h100_80gb_hbm3_pct_peak_vs_tokens.png": b"old 2"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.README_START}\nold\n{report.README_END}\n")

    def plot(wls, path, title):
        Path(path).write_bytes(b"new")
        return True

    def broken(*a, **k):
        raise RuntimeError("died")

    monkeypatch.setattr(report, "plot_speedup_vs_users", plot)
    monkeypatch.setattr(report, "plot_pct_peak_vs_tokens", broken if fails == "second plot" else plot)
    if fails == "table":
        monkeypatch.setattr(report, "others_section", broken)
    if fails == "readme block":
        monkeypatch.setattr(report, "readme_block", broken)
    h100 = dict(GPU, device="NVIDIA H100 80GB HBM3")
    src = _write(tmp_path / "b.json", [_entry("milp", 1.0), _entry("base", 0.9)], h100)
    with pytest.raises(RuntimeError, match="died"):
        report.build([src], out, readme=readme)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert "old" in readme.read_text()
    monkeypatch.setattr(report, "plot_pct_peak_vs_tokens", plot)
    monkeypatch.setattr(report, "others_section", lambda b: [])
    monkeypatch.setattr(report, "readme_block", lambda *a: ["new"])
    written = report.build([src], out, readme=readme)
    assert [p.name for p in written] == [*old, "README.md"]
    assert all(p.read_bytes() != old.get(p.name) for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(old)


# =========================================================================== property
TIMES = st.one_of(st.floats(1e-3, 1e3), st.sampled_from([0.0, float("nan"), float("inf"), -1.0, None]))
WORKLOADS = st.tuples(
    st.sampled_from(["fwd", "fwdbwd", "shrink", "layer-fwd"]),
    st.sampled_from(["7b-up", "7b-down", "13b-up", "7b-up-small"]),
    st.sampled_from([("decode", 32, 32, 0.0), ("decode", 256, 256, 0.0), ("decode", 8, 8, 0.0),
                     ("prefill", 4096, 32, 0.1), ("prefill", 16384, 32, 0.1), ("prefill", 512, 32, 0.1),
                     ("prefill", 4096, 32, 0.5), ("prefill", 4096, 8, 0.1)]),
    st.sampled_from(["mix", "r16", "32x8"]),
)
IMPLS = st.dictionaries(st.sampled_from(["milp", "base", "loop", "padded", "peft", "milp-split"]),
                        st.tuples(TIMES, st.one_of(st.none(), TIMES)), max_size=6)
DROP = st.sets(st.sampled_from(["op", "phase", "T", "users", "roofline_ms", "bound", "rel_err", "none_share"]),
               max_size=3)
FILES = st.lists(st.lists(st.tuples(WORKLOADS, IMPLS, DROP), max_size=6), min_size=1, max_size=3)


def _verdicts_follow_the_measurements(md, cpu):
    t = _targets(md)
    limits = {label: limit for label, _, _, limit in report.TARGETS}
    if not cpu:
        assert set(t) == set(LABELS)  # every target has a row, measured or not
    if cpu and set(t) == {"(no workload of this run matches a target)"}:
        return
    for label, rows in t.items():
        for _wl, r, g, _floor, limit, met in rows:
            assert limit == f"≤ {limits[label]:.2f}"
            ratios = [float(x) for x in (r, g) if x != "–"]
            if cpu:
                assert met == "n/a (CPU)"
            elif not ratios:
                assert met == "no measurement"
            else:  # printed to 3 decimals: a verdict at the limit itself is not checked
                assert met in ("yes", "**no**")
                best = min(ratios)
                assert abs(best - limits[label]) < 1e-3 or (met == "yes") == (best <= limits[label])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=FILES, cpu=st.booleans(), dupe_newer=st.booleans())
def test_any_cut_short_or_damaged_run_gives_whole_tables_and_honest_verdicts(tmp_path, monkeypatch, files, cpu,
                                                                           dupe_newer):
    _no_plots(monkeypatch)
    machine = dict(GPU, device="cpu", backend="torch (CPU path of the ops)") if cpu else GPU
    paths = []
    for f, entries in enumerate(files):
        benches = []
        for (op, shape, (phase, T, users, none), ranks), impls, drop in entries:
            for impl, (ms, graph) in impls.items():
                b = _entry(impl, ms, op=op, shape=shape, phase=phase, T=T, users=users, ranks=ranks, none=none,
                           graph=graph)
                for k in drop:
                    b["extra_info"].pop(k, None)
                benches.append(b)
        when = f"2026-11-28T0{5 + (f if dupe_newer else -f) % 4}:00:00+00:00"
        paths.append(_write(tmp_path / f"bench_{f}.json", benches, machine, when=when))
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    md = report.build(paths, out)[0].read_text(encoding="utf-8")
    _verdicts_follow_the_measurements(md, cpu)
    # no runtime workload here: on a GPU both runtime targets are listed as not measured
    assert [r[0] for r in _runtime(md)] == ([] if cpu else [t[0] for t in report.RUNTIME_TARGETS])
    assert all(r[-1] == "no measurement" for r in _runtime(md))
    for head, rows in _tables(md):  # a workload measured in several files: one row
        if head[:2] == ["workload", "milp ms"]:
            assert len({r[0] for r in rows}) == len(rows)
    assert [p.name for p in out.iterdir()] == [("cpu" if cpu else "gpu_nvidia_h200") + ".md"]


# =========================================================================== bench/_util.fill_ratios
def test_util_fill_ratios_records_no_ratio_from_a_time_that_is_no_measurement():
    """What conftest writes into each extra_info: a zero or NaN time made a ratio of 0 or NaN."""
    util = _module("_util")
    for bad in (0.0, float("nan"), float("inf")):
        ours = {"workload": "w", "impl": "milp", "time_ms": bad, "graph_ms": bad}
        base = {"workload": "w", "impl": "base", "time_ms": 2.0, "graph_ms": 1.0}
        util.fill_ratios([ours, base])
        assert not any(k.startswith(("ratio_vs", "graph_ratio_vs")) for k in {**ours, **base})
    ours = {"workload": "w", "impl": "milp", "time_ms": 1.0}
    base = {"workload": "w", "impl": "base", "time_ms": 2.0}
    util.fill_ratios([ours, base, {"workload": "other"}, None])
    assert ours["ratio_vs_base"] == 0.5 and base["ratio_vs_milp"] == 2.0


def test_the_real_saved_runs_give_whole_tables(tmp_path):
    """The committed CPU example and the H200 run's four stage files, merged as gpu_run.sh does."""
    gpu = sorted(str(p) for p in (ROOT / "bench" / "results" / "gpu").glob("bench_*.json"))
    md = report.build(gpu, tmp_path / "g")[0].read_text(encoding="utf-8")
    tables = _tables(md)
    assert len(tables) > 5 and "> note:" not in md
    t = _targets(md)
    assert set(t) == set(LABELS) and all(r[-1] == "**no**" for rows in t.values() for r in rows)
    assert os.path.basename(gpu[0]) in md
